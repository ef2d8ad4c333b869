//! Fake APNs provider API server.
