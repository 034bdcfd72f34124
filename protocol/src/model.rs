//! The conversation model of the public API as strict serde types.
