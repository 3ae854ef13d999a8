//! cairn: a remote build cache and remote execution system.
