/// An invalid transport option, found before any socket is opened.
///
/// `field` names the option, as spelled by its [`UdpOptions`](crate::UdpOptions)
/// method.
///
/// # Example
///
/// ```
/// use abyss_transport::UdpOptions;
///
/// let error = UdpOptions::new().multicast_ttl_v4(300).validate().unwrap_err();
/// assert_eq!(error.field, "multicast_ttl_v4");
/// assert_eq!(error.reason, "300 is over 255");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid transport option `{field}`: {reason}")]
#[non_exhaustive]
pub struct OptionsError {
    /// The option at fault.
    pub field: &'static str,
    /// What is wrong with it.
    pub reason: String,
}

impl OptionsError {
    pub(crate) fn new(field: &'static str, reason: impl Into<String>) -> Self {
        Self {
            field,
            reason: reason.into(),
        }
    }
}
