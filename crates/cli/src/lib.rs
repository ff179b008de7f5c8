//! Thin command-line binaries over the drafter libraries.
