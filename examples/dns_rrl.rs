//! Response rate limiting for DNS: what kind of response a DNS answer is,
//! and the truncated answer that replaces a limited one when it slips.
//!
//! Used by the forwarder and resolver examples (`--rrl-responses-per-second`)
//! with [`abyss::middleware::rrl::ResponseRateLimit`].

use std::hash::{BuildHasher, Hasher, RandomState};

use abyss::Bytes;
use abyss::middleware::rrl::{Classify, ResponseRateLimit};

use crate::dns::question;

/// The kind of a DNS response, as response rate limiting counts it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DnsClass {
    /// An answer (or an empty NOERROR) for one name and type; the name is
    /// kept as a keyed hash of its lower-cased wire form.
    Answer {
        /// The question's name, hashed.
        name: u64,
        /// The question's type.
        qtype: u16,
    },
    /// NXDOMAIN, whatever the name: a flood of random names is one kind
    /// (BIND groups them by zone; a forwarder does not know the zone).
    NxDomain,
    /// Any other response code.
    Error,
}

/// Classifies DNS responses by question name and type, NXDOMAIN and
/// errors, and slips a limited one as the same response truncated: header
/// and question only, TC set, so an honest client retries over TCP.
///
/// # Example
///
/// ```
/// use abyss::middleware::rrl::Classify;
/// use abyss_examples::dns_rrl::{DnsClass, DnsResponses};
///
/// // A response (QR set, NOERROR) for "a." type A with one answer.
/// let mut reply = vec![0x12, 0x34, 0x81, 0x80, 0, 1, 0, 1, 0, 0, 0, 0];
/// reply.extend_from_slice(&[1, b'a', 0, 0, 1, 0, 1]);
/// reply.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 192, 0, 2, 1]);
///
/// let classes = DnsResponses::new();
/// assert!(matches!(classes.classify(&reply), Some(DnsClass::Answer { qtype: 1, .. })));
/// let slip = classes.slip(&reply).unwrap();
/// assert_eq!(slip.len(), 12 + 7, "header and question only");
/// assert_eq!(slip[2] & 0x02, 0x02, "TC set");
/// ```
#[derive(Debug, Default, Clone)]
pub struct DnsResponses {
    hasher: RandomState,
}

impl DnsResponses {
    /// A classifier with a random key for its name hashes.
    ///
    /// # Example
    ///
    /// ```
    /// let classes = abyss_examples::dns_rrl::DnsResponses::new();
    /// # let _ = classes;
    /// ```
    pub fn new() -> Self {
        Self::default()
    }
}

impl Classify for DnsResponses {
    type Class = DnsClass;

    fn classify(&self, reply: &[u8]) -> Option<DnsClass> {
        let rcode = reply.get(3)? & 0x0f;
        match rcode {
            // A response that is not one is not ours to limit.
            _ if reply.get(2)? & 0x80 == 0 => None,
            0 => {
                // The name is hashed as it is read: classifying allocates
                // nothing.
                let mut hasher = self.hasher.build_hasher();
                Some(match question(reply, |byte| hasher.write_u8(byte)) {
                    Some((_, qtype)) => DnsClass::Answer {
                        name: hasher.finish(),
                        qtype,
                    },
                    // A NOERROR without one well-formed question is
                    // limited with the errors, not left unlimited.
                    None => DnsClass::Error,
                })
            }
            3 => Some(DnsClass::NxDomain),
            _ => Some(DnsClass::Error),
        }
    }

    fn slip(&self, reply: &[u8]) -> Option<Bytes> {
        let end = match question(reply, |_| {}) {
            Some((end, _)) => end,
            // No question to keep (some errors): the header alone.
            None => 12,
        };
        let mut slip = reply.get(..end)?.to_vec();
        slip[2] |= 0x02; // TC
        if end == 12 {
            slip[4..6].fill(0);
        }
        slip[6..12].fill(0); // no answers, authority or additional records
        Some(Bytes::from(slip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(name: &[u8], qtype: u16, rcode: u8) -> Vec<u8> {
        let mut reply = vec![0xab, 0xcd, 0x81, 0x80 | rcode, 0, 1, 0, 1, 0, 0, 0, 1];
        reply.extend_from_slice(name);
        reply.extend_from_slice(&qtype.to_be_bytes());
        reply.extend_from_slice(&[0, 1]);
        reply.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 192, 0, 2, 1]);
        reply.extend_from_slice(&[0, 0, 41, 4, 208, 0, 0, 0, 0, 0, 0]); // OPT
        reply
    }

    #[test]
    fn names_differing_in_case_are_one_kind_and_types_are_not() {
        let classes = DnsResponses::new();
        let lower = classes.classify(&response(b"\x04host\x04test\x00", 1, 0));
        let upper = classes.classify(&response(b"\x04HOST\x04Test\x00", 1, 0));
        let aaaa = classes.classify(&response(b"\x04host\x04test\x00", 28, 0));
        assert!(lower.is_some());
        assert_eq!(lower, upper);
        assert_ne!(lower, aaaa);
    }

    #[test]
    fn nxdomain_and_errors_are_one_kind_each_and_queries_none() {
        let classes = DnsResponses::new();
        let nx = |name: &[u8]| classes.classify(&response(name, 1, 3));
        assert_eq!(nx(b"\x01a\x00"), Some(DnsClass::NxDomain));
        assert_eq!(nx(b"\x01b\x00"), Some(DnsClass::NxDomain));
        assert_eq!(
            classes.classify(&response(b"\x01a\x00", 1, 2)),
            Some(DnsClass::Error)
        );
        let mut query = response(b"\x01a\x00", 1, 0);
        query[2] &= 0x7f;
        assert_eq!(classes.classify(&query), None);
        let mut two_questions = response(b"\x01a\x00", 1, 0);
        two_questions[5] = 2;
        assert_eq!(classes.classify(&two_questions), Some(DnsClass::Error));
    }

    #[test]
    fn a_slip_is_the_header_and_question_truncated() {
        let reply = response(b"\x04host\x04test\x00", 1, 0);
        let slip = DnsResponses::new().slip(&reply).unwrap();
        assert_eq!(&slip[..2], &reply[..2], "same ID");
        assert_eq!(slip[2] & 0x02, 0x02, "TC");
        assert_eq!(&slip[4..12], &[0, 1, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&slip[12..], &reply[12..12 + 11 + 4]);
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let classes = DnsResponses::new();
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for len in 0..400 {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state as u8
                })
                .collect();
            let _ = classes.classify(&bytes);
            let _ = classes.slip(&bytes);
        }
    }
}

/// Response rate limiting options of the DNS examples (BIND's
/// `rate-limit` clause).
#[derive(Debug, Clone, clap::Args)]
pub struct RrlArgs {
    /// Responses of one kind (name and type, NXDOMAIN, error) per second
    /// to one client network (/24, /56); 0 turns response rate limiting
    /// off (BIND's `responses-per-second`).
    #[arg(long, default_value_t = 0)]
    pub rrl_responses_per_second: u32,
    /// Seconds of debt a flooding network's account can run up (BIND's
    /// `window`).
    #[arg(long, default_value_t = 15)]
    pub rrl_window_secs: u64,
    /// Every Nth limited response is sent truncated (TC=1) instead of
    /// dropped, so honest clients retry over TCP; 0 never (BIND's `slip`).
    #[arg(long, default_value_t = 2)]
    pub rrl_slip: u32,
    /// Count and log what would be limited, but send it (BIND's
    /// `log-only`).
    #[arg(long)]
    pub rrl_log_only: bool,
}

impl RrlArgs {
    /// The limiter these options describe, sparing the peers `exempt`
    /// vouches for (clients that returned a good DNS cookie); `None` when
    /// off.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_examples::dns_rrl::RrlArgs;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let nobody = |_peer: std::net::SocketAddr| false;
    /// let off = RrlArgs { rrl_responses_per_second: 0, rrl_window_secs: 15, rrl_slip: 2, rrl_log_only: false };
    /// assert!(off.limiter(nobody)?.is_none());
    /// let on = RrlArgs { rrl_responses_per_second: 5, ..off };
    /// assert!(on.limiter(nobody)?.is_some());
    /// # Ok(())
    /// # }
    /// ```
    pub fn limiter(
        &self,
        exempt: impl abyss::middleware::Validate,
    ) -> Result<Option<ResponseRateLimit<DnsResponses>>, abyss::middleware::RateLimitError> {
        if self.rrl_responses_per_second == 0 {
            return Ok(None);
        }
        ResponseRateLimit::builder(DnsResponses::new(), self.rrl_responses_per_second)
            .window(std::time::Duration::from_secs(self.rrl_window_secs))
            .slip(self.rrl_slip)
            .log_only(self.rrl_log_only)
            .exempt(exempt)
            .build()
            .map(Some)
    }
}
