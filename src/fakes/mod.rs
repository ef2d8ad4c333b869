//! Fake APNs and FCM servers speaking the real protocols, for tests and `herald demo`.

pub mod apns;
pub mod fcm;
