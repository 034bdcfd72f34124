//! Binary frame format: the TCP protocol frame and the storage record are the same bytes.
