//! Fake FCM HTTP v1 server with its OAuth2 token endpoint.
