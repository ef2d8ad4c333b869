//! Verification, extractor and JWKS tests. Keys come from `testdata/` (test-only) and the
//! JWKS server binds 127.0.0.1:0, so nothing leaves the machine.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{FromRequestParts, State};
use axum::http::{Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header};
use serde_json::{Value, json};

use super::jwks::{JwksSettings, parse_jwks};
use super::*;
use crate::config::{AuthConfig, Secret};

const SECRET: &str = "test-only-hs256-secret-0123456789abcdef";
const RSA1_PRIVATE: &str = include_str!("testdata/test_only_rsa1_private.pem");
const RSA1_PUBLIC: &str = include_str!("testdata/test_only_rsa1_public.pem");
const RSA2_PRIVATE: &str = include_str!("testdata/test_only_rsa2_private.pem");
const RSA2_PUBLIC: &str = include_str!("testdata/test_only_rsa2_public.pem");
const EC_PRIVATE: &str = include_str!("testdata/test_only_ec_p256_private.pem");
const EC_PUBLIC: &str = include_str!("testdata/test_only_ec_p256_public.pem");

fn testdata(name: &str) -> String {
    format!("{}/src/auth/testdata/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn config() -> AuthConfig {
    AuthConfig {
        hs256_secret: Secret::default(),
        public_key_file: String::new(),
        jwks_url: String::new(),
        issuer: String::new(),
        audience: String::new(),
        leeway_secs: 0,
        jwks_cache_secs: 300,
        jwks_min_refetch_secs: 30,
    }
}

fn hs_config() -> AuthConfig {
    AuthConfig {
        hs256_secret: Secret::new(SECRET),
        ..config()
    }
}

fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

fn claims(sub: &str) -> Value {
    json!({ "sub": sub, "iat": now(), "exp": now() + 600 })
}

fn with(mut claims: Value, name: &str, value: Value) -> Value {
    claims[name] = value;
    claims
}

fn without(mut claims: Value, name: &str) -> Value {
    if let Some(map) = claims.as_object_mut() {
        map.remove(name);
    }
    claims
}

fn sign(alg: Algorithm, key: &EncodingKey, kid: Option<&str>, claims: &Value) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, key).unwrap()
}

fn hs(claims: &Value) -> String {
    sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(SECRET.as_bytes()),
        None,
        claims,
    )
}

fn rsa(pem: &str) -> EncodingKey {
    EncodingKey::from_rsa_pem(pem.as_bytes()).unwrap()
}

fn ec() -> EncodingKey {
    EncodingKey::from_ec_pem(EC_PRIVATE.as_bytes()).unwrap()
}

/// A token with arbitrary header and claims and a junk signature, for parser tests.
fn raw_token(header: &Value, claims: &Value, signature: &str) -> String {
    let part = |v: &Value| URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap());
    format!("{}.{}.{signature}", part(header), part(claims))
}

async fn auth(cfg: AuthConfig) -> Authenticator {
    Authenticator::from_config(&cfg).await.unwrap()
}

async fn pem_auth(file: &str) -> Authenticator {
    auth(AuthConfig {
        public_key_file: testdata(file),
        ..config()
    })
    .await
}

fn parts(uri: &str, authorization: Option<&str>) -> http::request::Parts {
    let mut builder = Request::builder().uri(uri);
    if let Some(value) = authorization {
        builder = builder.header(header::AUTHORIZATION, value);
    }
    builder.body(()).unwrap().into_parts().0
}

fn assert_401(err: ApiError) {
    let response = err.into_response();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(response.headers()[header::WWW_AUTHENTICATE], "Bearer");
    assert_eq!(
        response.headers()[header::CONTENT_TYPE],
        "application/problem+json"
    );
}

// ---- HS256 and claims -------------------------------------------------------------------

#[tokio::test]
async fn hs256_token_yields_principal_with_scopes() {
    let auth = auth(hs_config()).await;
    let token = mint_hs256(
        &Secret::new(SECRET),
        "alice",
        Some("events:publish  jobs:work"),
        Duration::from_secs(60),
        None,
        None,
    )
    .unwrap();
    let principal = auth.verify(&token).await.unwrap();
    assert_eq!(principal.sub, "alice");
    assert_eq!(principal.scopes, ["events:publish", "jobs:work"]);
    assert!(principal.has_scope("jobs:work"));
    assert!(!principal.has_scope("jobs"));
    assert!(principal.require_scope("events:publish").is_ok());
}

#[tokio::test]
async fn minted_token_carries_iat_exp_iss_aud() {
    let cfg = AuthConfig {
        issuer: "https://id.example".into(),
        audience: "herald".into(),
        ..hs_config()
    };
    let token = mint_hs256(
        &cfg.hs256_secret,
        "bob",
        None,
        Duration::from_secs(3600),
        Some(&cfg.issuer),
        Some(&cfg.audience),
    )
    .unwrap();
    let principal = auth(cfg).await.verify(&token).await.unwrap();
    assert_eq!(principal.sub, "bob");
    assert!(principal.scopes.is_empty());

    let claims: Value = jsonwebtoken::dangerous::insecure_decode_claims(&token).unwrap();
    let iat = claims["iat"].as_u64().unwrap();
    assert_eq!(claims["exp"].as_u64().unwrap(), iat + 3600);
    assert_eq!(claims["iss"], "https://id.example");
    assert_eq!(claims["aud"], "herald");
    assert!(claims.get("nbf").is_none() && claims.get("scope").is_none());
}

#[tokio::test]
async fn malformed_tokens_are_refused() {
    let auth = auth(hs_config()).await;
    let good = claims("alice");
    let cases = [
        String::new(),
        "abc".into(),
        "a.b".into(),
        "a.b.c".into(),
        "a.b.c.d".into(),
        // Empty signature (the "unsecured JWT" shape).
        raw_token(&json!({"alg": "HS256"}), &good, ""),
        // Header that is not JSON.
        format!("{}.e30.c2ln", URL_SAFE_NO_PAD.encode("not json")),
        // Critical header extension we do not implement.
        raw_token(
            &json!({"alg": "HS256", "crit": ["b64"], "b64": false}),
            &good,
            "c2ln",
        ),
        // Oversized.
        "x".repeat(20_000),
    ];
    for token in cases {
        match auth.verify(&token).await {
            Err(AuthError::Malformed(_)) => {}
            other => panic!("{:.40}: {other:?}", token),
        }
    }
    // Valid signature over a payload that is not JSON.
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256"}"#);
    let message = format!("{header}.{}", URL_SAFE_NO_PAD.encode(b"not json"));
    let signature = jsonwebtoken::crypto::sign(
        message.as_bytes(),
        &EncodingKey::from_secret(SECRET.as_bytes()),
        Algorithm::HS256,
    )
    .unwrap();
    let result = auth.verify(&format!("{message}.{signature}")).await;
    assert!(matches!(result, Err(AuthError::Malformed(_))), "{result:?}");
}

#[tokio::test]
async fn unsigned_alg_none_is_refused() {
    let auth = auth(hs_config()).await;
    let token = raw_token(&json!({"alg": "none"}), &claims("mallory"), "c2ln");
    assert_eq!(auth.verify(&token).await, Err(AuthError::WrongAlgorithm));
}

#[tokio::test]
async fn bad_signature_is_refused() {
    let auth = auth(hs_config()).await;
    let other = sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(b"another-secret-of-sufficient-length!!"),
        None,
        &claims("alice"),
    );
    assert_eq!(auth.verify(&other).await, Err(AuthError::BadSignature));

    // Same signature, payload swapped for one that names someone else.
    let token = hs(&claims("alice"));
    let forged_payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims("mallory")).unwrap());
    let pieces: Vec<&str> = token.split('.').collect();
    let tampered = format!("{}.{forged_payload}.{}", pieces[0], pieces[2]);
    assert_eq!(auth.verify(&tampered).await, Err(AuthError::BadSignature));

    let rs = pem_auth("test_only_rsa1_public.pem").await;
    let wrong_key = sign(Algorithm::RS256, &rsa(RSA2_PRIVATE), None, &claims("alice"));
    assert_eq!(rs.verify(&wrong_key).await, Err(AuthError::BadSignature));
}

#[tokio::test]
async fn expired_and_leeway() {
    let strict = auth(hs_config()).await;
    let expired = hs(&with(claims("alice"), "exp", json!(now() - 60)));
    assert_eq!(strict.verify(&expired).await, Err(AuthError::Expired));

    let lenient = auth(AuthConfig {
        leeway_secs: 120,
        ..hs_config()
    })
    .await;
    assert!(lenient.verify(&expired).await.is_ok());
    let long_expired = hs(&with(claims("alice"), "exp", json!(now() - 3600)));
    assert_eq!(lenient.verify(&long_expired).await, Err(AuthError::Expired));
}

#[tokio::test]
async fn exp_is_required() {
    let auth = auth(hs_config()).await;
    let token = hs(&without(claims("alice"), "exp"));
    let err = auth.verify(&token).await.unwrap_err();
    assert!(matches!(err, AuthError::Malformed(_)), "{err:?}");
    assert!(err.to_string().contains("exp"), "{err}");
    let text_exp = hs(&with(claims("alice"), "exp", json!("tomorrow")));
    assert!(matches!(
        auth.verify(&text_exp).await,
        Err(AuthError::Malformed(_))
    ));
}

#[tokio::test]
async fn not_yet_valid_is_refused() {
    let auth = auth(hs_config()).await;
    let future = hs(&with(claims("alice"), "nbf", json!(now() + 3600)));
    assert_eq!(auth.verify(&future).await, Err(AuthError::NotYetValid));
    let past = hs(&with(claims("alice"), "nbf", json!(now() - 10)));
    assert!(auth.verify(&past).await.is_ok());
}

#[tokio::test]
async fn issuer_is_checked_only_when_configured() {
    let checked = auth(AuthConfig {
        issuer: "https://id.example".into(),
        ..hs_config()
    })
    .await;
    let right = hs(&with(claims("a"), "iss", json!("https://id.example")));
    let wrong = hs(&with(claims("a"), "iss", json!("https://evil.example")));
    let absent = hs(&claims("a"));
    assert!(checked.verify(&right).await.is_ok());
    assert_eq!(checked.verify(&wrong).await, Err(AuthError::WrongIssuer));
    assert_eq!(checked.verify(&absent).await, Err(AuthError::WrongIssuer));

    let unchecked = auth(hs_config()).await;
    assert!(unchecked.verify(&wrong).await.is_ok());
}

#[tokio::test]
async fn audience_is_checked_only_when_configured() {
    let checked = auth(AuthConfig {
        audience: "herald".into(),
        ..hs_config()
    })
    .await;
    let right = hs(&with(claims("a"), "aud", json!("herald")));
    let among = hs(&with(claims("a"), "aud", json!(["other", "herald"])));
    let wrong = hs(&with(claims("a"), "aud", json!("other")));
    let absent = hs(&claims("a"));
    assert!(checked.verify(&right).await.is_ok());
    assert!(checked.verify(&among).await.is_ok());
    assert_eq!(checked.verify(&wrong).await, Err(AuthError::WrongAudience));
    assert_eq!(checked.verify(&absent).await, Err(AuthError::WrongAudience));

    let unchecked = auth(hs_config()).await;
    assert!(unchecked.verify(&wrong).await.is_ok());
}

#[tokio::test]
async fn sub_must_be_a_non_empty_string() {
    let auth = auth(hs_config()).await;
    for sub in [
        None,
        Some(json!("")),
        Some(json!("   ")),
        Some(json!(42)),
        Some(Value::Null),
    ] {
        let claims = match &sub {
            Some(value) => with(claims("x"), "sub", value.clone()),
            None => without(claims("x"), "sub"),
        };
        assert_eq!(
            auth.verify(&hs(&claims)).await,
            Err(AuthError::MissingSub),
            "{sub:?}"
        );
    }
}

#[tokio::test]
async fn scope_claim_forms() {
    let auth = auth(hs_config()).await;
    let array = hs(&with(
        claims("a"),
        "scope",
        json!(["jobs:work", "events:publish"]),
    ));
    assert_eq!(
        auth.verify(&array).await.unwrap().scopes,
        ["jobs:work", "events:publish"]
    );
    let number = hs(&with(claims("a"), "scope", json!(7)));
    assert!(matches!(
        auth.verify(&number).await,
        Err(AuthError::Malformed(_))
    ));
}

#[test]
fn missing_scope_is_forbidden() {
    let principal = Principal {
        sub: "alice".into(),
        scopes: vec!["jobs:work".into()],
    };
    match principal.require_scope("events:publish") {
        Err(ApiError::Forbidden(message)) => {
            assert!(message.contains("events:publish"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    let response = principal
        .require_scope("events:publish")
        .unwrap_err()
        .into_response();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
}

#[test]
fn every_auth_error_is_a_401_with_bearer_challenge() {
    let all = [
        AuthError::MissingCredentials,
        AuthError::Malformed("x"),
        AuthError::BadSignature,
        AuthError::Expired,
        AuthError::NotYetValid,
        AuthError::WrongAlgorithm,
        AuthError::WrongIssuer,
        AuthError::WrongAudience,
        AuthError::MissingSub,
        AuthError::UnknownKey,
    ];
    for err in all {
        assert_401(ApiError::from(err));
    }
    assert!(matches!(
        ApiError::from(AuthError::JwksUnavailable),
        ApiError::Unavailable(_)
    ));
}

// ---- algorithm confusion ----------------------------------------------------------------

#[tokio::test]
async fn hs256_signed_with_rsa_public_key_is_refused_by_rs256_verifier() {
    let auth = pem_auth("test_only_rsa1_public.pem").await;
    // The classic confusion attack: the public key is public, so use it as an HMAC secret.
    for secret in [RSA1_PUBLIC, RSA1_PUBLIC.trim()] {
        let forged = sign(
            Algorithm::HS256,
            &EncodingKey::from_secret(secret.as_bytes()),
            None,
            &claims("mallory"),
        );
        assert_eq!(auth.verify(&forged).await, Err(AuthError::WrongAlgorithm));
    }
    // The same verifier accepts a real RS256 token, so the refusal is about the algorithm.
    let genuine = sign(Algorithm::RS256, &rsa(RSA1_PRIVATE), None, &claims("alice"));
    assert_eq!(auth.verify(&genuine).await.unwrap().sub, "alice");
}

#[tokio::test]
async fn verifiers_refuse_tokens_of_another_algorithm() {
    let rs256 = sign(Algorithm::RS256, &rsa(RSA1_PRIVATE), None, &claims("a"));
    let es = pem_auth("test_only_ec_p256_public.pem").await;
    assert_eq!(es.verify(&rs256).await, Err(AuthError::WrongAlgorithm));
    let hs_auth = auth(hs_config()).await;
    assert_eq!(hs_auth.verify(&rs256).await, Err(AuthError::WrongAlgorithm));
    // Same key family, other hash: still not the configured algorithm.
    let rs = pem_auth("test_only_rsa1_public.pem").await;
    let rs384 = sign(Algorithm::RS384, &rsa(RSA1_PRIVATE), None, &claims("a"));
    assert_eq!(rs.verify(&rs384).await, Err(AuthError::WrongAlgorithm));
}

// ---- PEM keys and setup -----------------------------------------------------------------

#[tokio::test]
async fn rs256_pem_happy_path() {
    let auth = pem_auth("test_only_rsa1_public.pem").await;
    let token = sign(
        Algorithm::RS256,
        &rsa(RSA1_PRIVATE),
        None,
        &with(claims("carol"), "scope", json!("jobs:work")),
    );
    let principal = auth.verify(&token).await.unwrap();
    assert_eq!(principal.sub, "carol");
    assert!(principal.has_scope("jobs:work"));
}

#[tokio::test]
async fn es256_pem_happy_path() {
    let auth = pem_auth("test_only_ec_p256_public.pem").await;
    let token = sign(Algorithm::ES256, &ec(), None, &claims("dave"));
    assert_eq!(auth.verify(&token).await.unwrap().sub, "dave");
}

#[tokio::test]
async fn setup_errors_name_the_config_key() {
    let err = Authenticator::from_config(&config()).await.unwrap_err();
    assert!(matches!(err, AuthSetupError::NoKeySource));
    let text = err.to_string();
    for key in ["auth.hs256_secret", "auth.public_key_file", "auth.jwks_url"] {
        assert!(text.contains(key), "{text}");
    }

    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "hello").unwrap();
    let cases = [
        (testdata("does_not_exist.pem"), "cannot read"),
        (testdata("test_only_rsa1_private.pem"), "private key"),
        (testdata("test_only_ec_p384_public.pem"), "P-256"),
        (garbage.display().to_string(), "not an RSA or EC"),
    ];
    for (file, expected) in cases {
        let cfg = AuthConfig {
            public_key_file: file.clone(),
            ..config()
        };
        let err = Authenticator::from_config(&cfg)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("auth.public_key_file: "), "{err}");
        assert!(err.contains(expected), "{file}: {err}");
        assert!(!err.contains("BEGIN"), "key material leaked: {err}");
    }

    for url in ["not a url", "ftp://keys.example/jwks", "/relative/jwks"] {
        let cfg = AuthConfig {
            jwks_url: url.into(),
            ..config()
        };
        let err = Authenticator::from_config(&cfg)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("auth.jwks_url: "), "{url}: {err}");
    }
}

#[tokio::test]
async fn hs256_secret_wins_over_other_sources() {
    let cfg = AuthConfig {
        public_key_file: testdata("test_only_rsa1_public.pem"),
        jwks_url: "http://127.0.0.1:9/unused".into(),
        ..hs_config()
    };
    let auth = auth(cfg).await;
    assert!(auth.verify(&hs(&claims("a"))).await.is_ok());
    assert!(!format!("{auth:?}").contains(SECRET));
}

// ---- extractors -------------------------------------------------------------------------

#[test]
fn bearer_token_reads_header_and_optionally_the_query() {
    assert_eq!(
        bearer_token(&parts("/", Some("Bearer abc")), false).as_deref(),
        Some("abc")
    );
    assert_eq!(
        bearer_token(&parts("/", Some("bearer  abc ")), false).as_deref(),
        Some("abc")
    );
    assert_eq!(
        bearer_token(&parts("/", Some("BEARER abc")), false).as_deref(),
        Some("abc")
    );
    assert_eq!(bearer_token(&parts("/", Some("Basic abc")), false), None);
    assert_eq!(bearer_token(&parts("/", Some("Bearer")), false), None);
    assert_eq!(bearer_token(&parts("/", None), false), None);

    let query = parts("/v1/updates/stream?after=3&access_token=a%2Eb.c", None);
    assert_eq!(bearer_token(&query, false), None);
    assert_eq!(bearer_token(&query, true).as_deref(), Some("a.b.c"));
    assert_eq!(bearer_token(&parts("/s?access_token=", None), true), None);
    let both = parts("/s?access_token=from-query", Some("Bearer from-header"));
    assert_eq!(bearer_token(&both, true).as_deref(), Some("from-header"));
}

#[tokio::test]
async fn auth_user_extractor() {
    let auth = auth(hs_config()).await;
    let token = hs(&claims("erin"));

    let mut ok = parts("/v1/devices", Some(&format!("bEaReR {token}")));
    let AuthUser(principal) = AuthUser::from_request_parts(&mut ok, &auth).await.unwrap();
    assert_eq!(principal.sub, "erin");

    let mut missing = parts("/v1/devices", None);
    assert_401(
        AuthUser::from_request_parts(&mut missing, &auth)
            .await
            .unwrap_err(),
    );

    // The query parameter is for streams only.
    let mut query = parts(&format!("/v1/devices?access_token={token}"), None);
    assert_401(
        AuthUser::from_request_parts(&mut query, &auth)
            .await
            .unwrap_err(),
    );

    let mut expired = parts(
        "/v1/devices",
        Some(&format!(
            "Bearer {}",
            hs(&with(claims("e"), "exp", json!(1)))
        )),
    );
    let err = AuthUser::from_request_parts(&mut expired, &auth)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("expired"), "{err}");
    assert_401(err);
}

#[tokio::test]
async fn stream_user_extractor_accepts_query_token() {
    let auth = auth(hs_config()).await;
    let token = hs(&claims("frank"));
    let mut query = parts(&format!("/v1/updates/stream?access_token={token}"), None);
    let StreamUser(principal) = StreamUser::from_request_parts(&mut query, &auth)
        .await
        .unwrap();
    assert_eq!(principal.sub, "frank");

    let mut bad = parts("/v1/updates/stream?access_token=nope", None);
    let err = StreamUser::from_request_parts(&mut bad, &auth)
        .await
        .unwrap_err();
    assert!(!err.to_string().contains("nope"));
    assert_401(err);
}

// ---- JWKS -------------------------------------------------------------------------------

struct JwksServer {
    keys: Mutex<Vec<Value>>,
    fail: AtomicBool,
    hits: AtomicUsize,
}

impl JwksServer {
    fn new(keys: Vec<Value>) -> Arc<Self> {
        Arc::new(Self {
            keys: Mutex::new(keys),
            fail: AtomicBool::new(false),
            hits: AtomicUsize::new(0),
        })
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    fn set_keys(&self, keys: Vec<Value>) {
        *self.keys.lock().unwrap() = keys;
    }
}

async fn jwks_handler(State(server): State<Arc<JwksServer>>) -> Response {
    server.hits.fetch_add(1, Ordering::SeqCst);
    // Slow enough that concurrent misses overlap with the fetch in flight.
    tokio::time::sleep(Duration::from_millis(50)).await;
    if server.fail.load(Ordering::SeqCst) {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    let keys = server.keys.lock().unwrap().clone();
    axum::Json(json!({ "keys": keys })).into_response()
}

async fn serve_jwks(server: Arc<JwksServer>) -> String {
    let app = Router::new()
        .route("/jwks", get(jwks_handler))
        .with_state(server);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}/jwks")
}

fn jwk(key: &DecodingKey, kid: &str, alg: Option<Algorithm>) -> Value {
    let mut jwk = Jwk::from_decoding_key(key, alg).unwrap();
    jwk.common.key_id = Some(kid.to_owned());
    serde_json::to_value(jwk).unwrap()
}

fn rsa_jwk(public_pem: &str, kid: &str) -> Value {
    jwk(
        &DecodingKey::from_rsa_pem(public_pem.as_bytes()).unwrap(),
        kid,
        Some(Algorithm::RS256),
    )
}

async fn jwks_auth(url: String, cache_ttl: Duration, min_refetch: Duration) -> Authenticator {
    let cfg = AuthConfig {
        jwks_url: url,
        ..config()
    };
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let settings = JwksSettings {
        cache_ttl,
        min_refetch,
    };
    Authenticator::from_jwks(&cfg, settings, client)
        .await
        .unwrap()
}

const HOUR: Duration = Duration::from_secs(3600);
const WINDOW: Duration = Duration::from_secs(1);
const PAST_WINDOW: Duration = Duration::from_millis(1100);

#[tokio::test]
async fn jwks_refetch_on_unknown_kid_is_rate_limited_and_shared() {
    let server = JwksServer::new(vec![rsa_jwk(RSA1_PUBLIC, "k1")]);
    let auth = jwks_auth(serve_jwks(server.clone()).await, HOUR, WINDOW).await;
    assert_eq!(server.hits(), 1, "warmed at startup");

    let t1 = sign(
        Algorithm::RS256,
        &rsa(RSA1_PRIVATE),
        Some("k1"),
        &claims("alice"),
    );
    assert_eq!(auth.verify(&t1).await.unwrap().sub, "alice");
    // A single-key set also serves tokens without a kid.
    let no_kid = sign(Algorithm::RS256, &rsa(RSA1_PRIVATE), None, &claims("alice"));
    assert!(auth.verify(&no_kid).await.is_ok());
    assert_eq!(server.hits(), 1, "fresh cache hits do not fetch");

    // Unknown kid right after a fetch: rate-limited, no new request.
    let t2 = sign(
        Algorithm::RS256,
        &rsa(RSA2_PRIVATE),
        Some("k2"),
        &claims("bob"),
    );
    assert_eq!(auth.verify(&t2).await, Err(AuthError::UnknownKey));
    assert_eq!(server.hits(), 1);

    // The IdP rotates in k2; once the window has passed the unknown kid triggers one refetch.
    server.set_keys(vec![rsa_jwk(RSA1_PUBLIC, "k1"), rsa_jwk(RSA2_PUBLIC, "k2")]);
    tokio::time::sleep(PAST_WINDOW).await;
    assert_eq!(auth.verify(&t2).await.unwrap().sub, "bob");
    assert_eq!(server.hits(), 2);

    let t3 = sign(
        Algorithm::RS256,
        &rsa(RSA2_PRIVATE),
        Some("k3"),
        &claims("eve"),
    );
    assert_eq!(auth.verify(&t3).await, Err(AuthError::UnknownKey));
    assert_eq!(
        server.hits(),
        2,
        "second unknown kid within the window does not fetch"
    );
    // With two keys a token without kid is ambiguous.
    assert_eq!(auth.verify(&no_kid).await, Err(AuthError::UnknownKey));

    // Many concurrent misses share one fetch.
    tokio::time::sleep(PAST_WINDOW).await;
    let results = futures::future::join_all((0..8).map(|_| auth.verify(&t3))).await;
    assert!(
        results.iter().all(|r| *r == Err(AuthError::UnknownKey)),
        "{results:?}"
    );
    assert_eq!(server.hits(), 3);
    assert_eq!(auth.verify(&t3).await, Err(AuthError::UnknownKey));
    assert_eq!(server.hits(), 3);
    assert!(auth.verify(&t1).await.is_ok());
}

#[tokio::test]
async fn jwks_outage_keeps_cached_keys_and_revocation_works() {
    let server = JwksServer::new(vec![rsa_jwk(RSA1_PUBLIC, "k1")]);
    let auth = jwks_auth(serve_jwks(server.clone()).await, WINDOW, WINDOW).await;
    let t1 = sign(
        Algorithm::RS256,
        &rsa(RSA1_PRIVATE),
        Some("k1"),
        &claims("alice"),
    );
    assert!(auth.verify(&t1).await.is_ok());

    // Endpoint down and cache stale: the refetch fails, the cached key still works.
    server.fail.store(true, Ordering::SeqCst);
    tokio::time::sleep(PAST_WINDOW).await;
    assert!(auth.verify(&t1).await.is_ok());
    assert_eq!(server.hits(), 2);
    let unknown = sign(
        Algorithm::RS256,
        &rsa(RSA2_PRIVATE),
        Some("k9"),
        &claims("x"),
    );
    assert_eq!(auth.verify(&unknown).await, Err(AuthError::JwksUnavailable));
    assert_eq!(server.hits(), 2, "a failed fetch is rate-limited too");

    // Back up with k1 removed: after the next refetch k1 is refused, k2 accepted.
    server.fail.store(false, Ordering::SeqCst);
    server.set_keys(vec![rsa_jwk(RSA2_PUBLIC, "k2")]);
    tokio::time::sleep(PAST_WINDOW).await;
    assert_eq!(auth.verify(&t1).await, Err(AuthError::UnknownKey));
    assert_eq!(server.hits(), 3);
    let t2 = sign(
        Algorithm::RS256,
        &rsa(RSA2_PRIVATE),
        Some("k2"),
        &claims("bob"),
    );
    assert_eq!(auth.verify(&t2).await.unwrap().sub, "bob");
}

#[tokio::test]
async fn jwks_down_at_startup_does_not_fail_setup() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/jwks", listener.local_addr().unwrap());
    drop(listener);
    let auth = jwks_auth(url, HOUR, WINDOW).await;
    let token = sign(
        Algorithm::RS256,
        &rsa(RSA1_PRIVATE),
        Some("k1"),
        &claims("a"),
    );
    assert_eq!(auth.verify(&token).await, Err(AuthError::JwksUnavailable));
}

#[tokio::test]
async fn jwks_algorithm_comes_from_the_key() {
    let ec_public = DecodingKey::from_ec_pem(EC_PUBLIC.as_bytes()).unwrap();
    let server = JwksServer::new(vec![
        rsa_jwk(RSA1_PUBLIC, "rs"),
        // No `alg`: ES256 follows from crv P-256.
        jwk(&ec_public, "ec", None),
        // Symmetric keys in a JWKS are ignored outright.
        json!({"kty": "oct", "kid": "hmac", "alg": "HS256", "k": URL_SAFE_NO_PAD.encode(SECRET)}),
    ]);
    let auth = jwks_auth(serve_jwks(server.clone()).await, HOUR, HOUR).await;

    let es = sign(Algorithm::ES256, &ec(), Some("ec"), &claims("ec-user"));
    assert_eq!(auth.verify(&es).await.unwrap().sub, "ec-user");
    let rs = sign(
        Algorithm::RS256,
        &rsa(RSA1_PRIVATE),
        Some("rs"),
        &claims("rs-user"),
    );
    assert_eq!(auth.verify(&rs).await.unwrap().sub, "rs-user");

    let refused = [
        // JWK says RS256.
        sign(
            Algorithm::RS384,
            &rsa(RSA1_PRIVATE),
            Some("rs"),
            &claims("x"),
        ),
        // An RSA signature presented under the EC key's kid.
        sign(
            Algorithm::RS256,
            &rsa(RSA1_PRIVATE),
            Some("ec"),
            &claims("x"),
        ),
        // HMAC with the RSA public key as secret, under the RSA kid.
        sign(
            Algorithm::HS256,
            &EncodingKey::from_secret(RSA1_PUBLIC.as_bytes()),
            Some("rs"),
            &claims("x"),
        ),
        // HMAC with the published oct key.
        sign(
            Algorithm::HS256,
            &EncodingKey::from_secret(SECRET.as_bytes()),
            Some("hmac"),
            &claims("x"),
        ),
    ];
    for token in refused {
        assert_eq!(auth.verify(&token).await, Err(AuthError::WrongAlgorithm));
    }
    assert_eq!(server.hits(), 1, "algorithm refusals never trigger a fetch");
}

#[test]
fn parse_jwks_skips_unusable_keys() {
    let rsa_enc = with(rsa_jwk(RSA1_PUBLIC, "enc"), "use", json!("enc"));
    let mismatched = with(rsa_jwk(RSA1_PUBLIC, "mismatch"), "alg", json!("ES256"));
    let ec_bad_point = json!({"kty": "EC", "crv": "P-256", "kid": "bad", "x": "AAAA", "y": "AAAA"});
    let weird = json!({"kty": "XYZ", "kid": "weird"});
    let good = rsa_jwk(RSA2_PUBLIC, "good");
    let body =
        serde_json::to_vec(&json!({"keys": [rsa_enc, mismatched, ec_bad_point, weird, good]}))
            .unwrap();
    let keys = parse_jwks(&body).unwrap();
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0].kid.as_deref(), Some("good"));
    assert_eq!(keys[0].alg, Algorithm::RS256);
    assert!(parse_jwks(b"<html>").is_err());
}
