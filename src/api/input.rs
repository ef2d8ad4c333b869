//! Request bodies: the app's own JSON extractor (so bad bodies get problem documents) and a
//! small field reader that names every invalid field in one 422.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{StatusCode, header};
use serde_json::{Map, Value};

use crate::error::{ApiError, FieldError};

/// A JSON object body: 415 for another content type, 413 over the limit, 400 when it is not
/// JSON, 422 when it is JSON but not an object.
pub struct JsonObject(pub Map<String, Value>);

impl<S: Send + Sync> FromRequest<S> for JsonObject {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let is_json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .map(|mime| {
                let mime = mime.trim().to_ascii_lowercase();
                mime == "application/json"
                    || (mime.starts_with("application/") && mime.ends_with("+json"))
            })
            .unwrap_or(false);
        if !is_json {
            return Err(ApiError::UnsupportedMediaType(
                "expected Content-Type: application/json".into(),
            ));
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge
            } else {
                ApiError::BadRequest("could not read the request body".into())
            }
        })?;
        match serde_json::from_slice::<Value>(&bytes) {
            Ok(Value::Object(map)) => Ok(Self(map)),
            Ok(_) => Err(ApiError::Unprocessable(
                "the request body must be a JSON object".into(),
            )),
            Err(err) => Err(ApiError::BadRequest(format!("malformed JSON: {err}"))),
        }
    }
}

/// Reads typed fields from a JSON object, collecting every problem before answering.
pub struct Fields<'a> {
    map: &'a Map<String, Value>,
    prefix: String,
    errors: Vec<FieldError>,
}

impl<'a> Fields<'a> {
    /// Start reading `map`; nested readers prefix their field names.
    pub fn new(map: &'a Map<String, Value>) -> Self {
        Self {
            map,
            prefix: String::new(),
            errors: Vec::new(),
        }
    }

    fn name(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.prefix)
        }
    }

    /// Record a problem with `key`.
    pub fn error(&mut self, key: &str, message: impl Into<String>) {
        let field = self.name(key);
        self.errors.push(FieldError::new(field, message));
    }

    /// The raw value of `key`, treating JSON null as absent.
    pub fn raw(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    /// An optional string.
    pub fn opt_str(&mut self, key: &str) -> Option<&'a str> {
        match self.raw(key) {
            None => None,
            Some(Value::String(s)) => Some(s.as_str()),
            Some(_) => {
                self.error(key, "must be a string");
                None
            }
        }
    }

    /// A required string.
    pub fn req_str(&mut self, key: &str) -> Option<&'a str> {
        if self.raw(key).is_none() {
            self.error(key, "is required");
            return None;
        }
        self.opt_str(key)
    }

    /// An optional string of at most `max` characters (and not empty).
    pub fn opt_text(&mut self, key: &str, max: usize) -> Option<&'a str> {
        let value = self.opt_str(key)?;
        if value.is_empty() || value.chars().count() > max {
            self.error(key, format!("must be 1 to {max} characters"));
            return None;
        }
        Some(value)
    }

    /// A required string of 1 to `max` characters.
    pub fn req_text(&mut self, key: &str, max: usize) -> Option<&'a str> {
        if self.raw(key).is_none() {
            self.error(key, "is required");
            return None;
        }
        self.opt_text(key, max)
    }

    /// An optional integer within `range`.
    pub fn opt_int(&mut self, key: &str, range: std::ops::RangeInclusive<i64>) -> Option<i64> {
        match self.raw(key) {
            None => None,
            Some(v) => match v.as_i64() {
                Some(n) if range.contains(&n) => Some(n),
                _ => {
                    self.error(
                        key,
                        format!(
                            "must be an integer from {} to {}",
                            range.start(),
                            range.end()
                        ),
                    );
                    None
                }
            },
        }
    }

    /// An optional boolean.
    pub fn opt_bool(&mut self, key: &str) -> Option<bool> {
        match self.raw(key) {
            None => None,
            Some(Value::Bool(b)) => Some(*b),
            Some(_) => {
                self.error(key, "must be true or false");
                None
            }
        }
    }

    /// An optional JSON object.
    pub fn opt_object(&mut self, key: &str) -> Option<&'a Map<String, Value>> {
        match self.raw(key) {
            None => None,
            Some(Value::Object(m)) => Some(m),
            Some(_) => {
                self.error(key, "must be a JSON object");
                None
            }
        }
    }

    /// Read a nested object with its own reader whose errors are prefixed by `key`.
    pub fn nested<T>(&mut self, key: &str, read: impl FnOnce(&mut Fields<'a>) -> T) -> Option<T> {
        let map = self.opt_object(key)?;
        let mut inner = Fields {
            map,
            prefix: self.name(key),
            errors: Vec::new(),
        };
        let value = read(&mut inner);
        self.errors.append(&mut inner.errors);
        Some(value)
    }

    /// Finish: the value when every field was valid, else one 422 naming them all.
    pub fn finish<T>(self, value: impl FnOnce() -> Option<T>) -> Result<T, ApiError> {
        if !self.errors.is_empty() {
            return Err(ApiError::Validation(self.errors));
        }
        value().ok_or_else(|| ApiError::Unprocessable("the request body is invalid".into()))
    }
}
