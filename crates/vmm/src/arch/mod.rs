//! Architecture support: guest memory layout and boot-time CPU/platform setup.

pub mod x86_64;
