//! Block devices, dirty tracking, lazy devices, the migration wire protocol and the migrator. Knows nothing of KVM.
