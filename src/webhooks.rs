//! Webhooks: callback URL checks (delivery and signing arrive with the webhooks issue).

use std::net::IpAddr;

/// Refuse callback targets that are not http(s) or that name a loopback, private or link-local
/// address, unless the operator allows private targets. Host names are checked again when
/// resolved at delivery time.
pub fn check_target(raw: &str, allow_private: bool) -> Result<(), String> {
    let url = url::Url::parse(raw).map_err(|_| "must be an absolute http(s) URL".to_string())?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err("must be an http or https URL".into());
    }
    if raw.len() > 2048 {
        return Err("must be at most 2048 characters".into());
    }
    let host = url
        .host_str()
        .ok_or_else(|| "must name a host".to_string())?;
    if allow_private {
        return Ok(());
    }
    let private = match host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
    {
        Ok(ip) => is_private(ip),
        Err(_) => host.eq_ignore_ascii_case("localhost") || host.ends_with(".localhost"),
    };
    if private {
        return Err("must not target a loopback, private or link-local address".into());
    }
    Ok(())
}

/// Loopback, private, link-local, unspecified or unique-local.
pub fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            v4.is_loopback() || v4.is_private() || v4.is_link_local() || v4.is_unspecified() || v4.is_broadcast()
                // 100.64.0.0/10 carrier-grade NAT
                || (v4.octets()[0] == 100 && (v4.octets()[1] & 0xc0) == 64)
        }
        IpAddr::V6(v6) => {
            v6.is_loopback()
                || v6.is_unspecified()
                || (v6.segments()[0] & 0xfe00) == 0xfc00
                || (v6.segments()[0] & 0xffc0) == 0xfe80
                || v6
                    .to_ipv4_mapped()
                    .is_some_and(|v4| is_private(IpAddr::V4(v4)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_targets_are_refused_unless_allowed() {
        for bad in [
            "http://127.0.0.1/x",
            "http://10.1.2.3/",
            "https://192.168.0.1",
            "http://169.254.169.254/latest",
            "http://[::1]:8080/",
            "http://[fe80::1]/",
            "http://localhost:9/",
            "ftp://example.com/",
            "not a url",
        ] {
            assert!(check_target(bad, false).is_err(), "{bad}");
        }
        assert!(check_target("https://hooks.example.com/herald", false).is_ok());
        assert!(check_target("http://127.0.0.1:9000/hook", true).is_ok());
        assert!(check_target("ftp://127.0.0.1/", true).is_err());
    }
}
