//! cairn storage engine
