//! The few facts the node needs from its X.509 certificate: validity period
//! and DNS names. A small DER walk over the end-entity certificate; rustls
//! (webpki) checks the rest when it loads the pair and in every handshake.

/// Validity and names of a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertMeta {
    /// notBefore, seconds since the Unix epoch.
    pub not_before: i64,
    /// notAfter, seconds since the Unix epoch.
    pub not_after: i64,
    /// The subjectAltName dNSName entries, in order.
    pub names: Vec<String>,
}

/// One DER element: (tag, content, rest of the input).
fn tlv(input: &[u8]) -> Result<(u8, &[u8], &[u8]), &'static str> {
    const BAD: &str = "malformed DER";
    let (&tag, rest) = input.split_first().ok_or(BAD)?;
    let (&first, mut rest) = rest.split_first().ok_or(BAD)?;
    let len = if first < 0x80 {
        first as usize
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return Err(BAD);
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | b as usize);
        rest = &rest[n..];
        len
    };
    if rest.len() < len {
        return Err(BAD);
    }
    Ok((tag, &rest[..len], &rest[len..]))
}

fn expect(input: &[u8], want: u8) -> Result<(&[u8], &[u8]), &'static str> {
    match tlv(input)? {
        (tag, content, rest) if tag == want => Ok((content, rest)),
        _ => Err("unexpected DER element"),
    }
}

const SEQUENCE: u8 = 0x30;
/// subjectAltName, 2.5.29.17.
const SAN_OID: &[u8] = &[0x55, 0x1d, 0x11];

/// Parse a DER certificate.
pub fn parse(der: &[u8]) -> Result<CertMeta, &'static str> {
    let (cert, _) = expect(der, SEQUENCE)?;
    let (tbs, _) = expect(cert, SEQUENCE)?;
    let mut rest = tbs;
    if rest.first() == Some(&0xa0) {
        rest = tlv(rest)?.2; // [0] version
    }
    for _ in 0..3 {
        rest = tlv(rest)?.2; // serialNumber, signature, issuer
    }
    let (validity, after_validity) = expect(rest, SEQUENCE)?;
    let (t1, content1, more) = tlv(validity)?;
    let (t2, content2, _) = tlv(more)?;
    let not_before = time(t1, content1)?;
    let not_after = time(t2, content2)?;
    rest = tlv(after_validity)?.2; // subject
    rest = tlv(rest)?.2; // subjectPublicKeyInfo
    let mut names = Vec::new();
    while !rest.is_empty() {
        let (tag, content, more) = tlv(rest)?;
        rest = more;
        if tag != 0xa3 {
            continue; // issuerUniqueID, subjectUniqueID
        }
        let (mut exts, _) = expect(content, SEQUENCE)?;
        while !exts.is_empty() {
            let (ext, more) = expect(exts, SEQUENCE)?;
            exts = more;
            let (oid, mut fields) = expect(ext, 0x06)?;
            if oid != SAN_OID {
                continue;
            }
            if fields.first() == Some(&0x01) {
                fields = tlv(fields)?.2; // critical
            }
            let (value, _) = expect(fields, 0x04)?;
            let (mut general_names, _) = expect(value, SEQUENCE)?;
            while !general_names.is_empty() {
                let (tag, name, more) = tlv(general_names)?;
                general_names = more;
                if tag == 0x82 {
                    // dNSName: IA5String
                    names.push(String::from_utf8_lossy(name).into_owned());
                }
            }
        }
    }
    Ok(CertMeta {
        not_before,
        not_after,
        names,
    })
}

/// UTCTime (YYMMDDHHMMSSZ) or GeneralizedTime (YYYYMMDDHHMMSSZ) to epoch seconds.
fn time(tag: u8, s: &[u8]) -> Result<i64, &'static str> {
    const BAD: &str = "bad certificate validity time";
    let digits = |s: &[u8]| -> Result<i64, &'static str> {
        s.iter().try_fold(0i64, |acc, &c| {
            if c.is_ascii_digit() {
                Ok(acc * 10 + (c - b'0') as i64)
            } else {
                Err(BAD)
            }
        })
    };
    let (year, rest) = match (tag, s.len()) {
        (0x17, 13) => {
            let yy = digits(&s[..2])?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &s[2..])
        }
        (0x18, 15) => (digits(&s[..4])?, &s[4..]),
        _ => return Err(BAD),
    };
    if rest[10] != b'Z' {
        return Err(BAD);
    }
    let field = |i: usize| digits(&rest[i..i + 2]);
    let (month, day) = (field(0)?, field(2)?);
    let (h, m, sec) = (field(4)?, field(6)?, field(8)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || h > 23 || m > 59 || sec > 60 {
        return Err(BAD);
    }
    Ok(days_from_civil(year, month, day) * 86400 + h * 3600 + m * 60 + sec)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

/// `2026-11-24 22:00:25 UTC` for epoch seconds (for error messages).
pub fn format_utc(t: i64) -> String {
    let days = t.div_euclid(86400);
    let secs = t.rem_euclid(86400);
    // Inverse of days_from_civil.
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_convert_both_ways() {
        assert_eq!(time(0x17, b"700101000000Z"), Ok(0));
        assert_eq!(time(0x17, b"491231235959Z"), Ok(2_524_607_999));
        assert_eq!(time(0x18, b"20380119031408Z"), Ok(2_147_483_648));
        assert_eq!(time(0x18, b"99991231235959Z"), Ok(253_402_300_799));
        assert!(time(0x17, b"70010100000Z").is_err());
        assert!(time(0x17, b"701301000000Z").is_err());
        assert_eq!(format_utc(2_147_483_648), "2038-01-19 03:14:08 UTC");
        assert_eq!(format_utc(951_782_400), "2000-02-29 00:00:00 UTC");
    }

    #[test]
    fn truncated_der_is_an_error() {
        assert!(parse(&[]).is_err());
        assert!(parse(&[0x30, 0x82, 0x01]).is_err());
        assert!(parse(&[0x30, 0x03, 0x30, 0x01, 0x00]).is_err());
    }
}
