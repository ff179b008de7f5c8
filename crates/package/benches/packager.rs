//! Packager benchmark (placeholder).
fn main() {}
