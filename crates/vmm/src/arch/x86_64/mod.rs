//! x86_64: memory layout, GDT, page tables, boot registers and MSRs, CPUID
//! normalisation and CPU templates, and the MP table.

pub mod acpi;
pub mod cpu_template;
pub mod cpuid;
pub mod gdt;
pub mod layout;
pub mod mptable;
pub mod regs;
