//! APNs HTTP/2 provider API sender (token auth).
