//! JWT verification and the request extractors that carry the authenticated user.
