//! FCM HTTP v1 sender (service-account OAuth2).
