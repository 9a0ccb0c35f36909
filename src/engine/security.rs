//! End-to-end encryption and message signing in the standard stacks (PROTOCOL.md §7, §8):
//! which of the decrypt, verify, sign and encrypt layers a connection gets, built from [`Config`].

use std::sync::Arc;

use wsengine_core::Limits;
use wsengine_services::connection::Connection;
use wsengine_services::publication::Publication;

use crate::config::Config;

/// The message-security part of the standard stacks, shared by every connection.
#[derive(Debug, Clone, Default)]
pub(super) struct MessageSecurity {
    #[cfg(feature = "encryption")]
    encryption: Option<wsengine_layers::encrypt::EncryptionMode>,
    #[cfg(feature = "signing")]
    signing: Option<Signing>,
}

#[cfg(feature = "signing")]
#[derive(Debug, Clone)]
struct Signing {
    signer: Arc<wsengine_layers::sign::Signer>,
    mode: wsengine_layers::sign::SigningMode,
    outbound: bool,
    reject_invalid: bool,
    require_types: Vec<String>,
    max_clock_skew: std::time::Duration,
    replay: Arc<wsengine_layers::sign::ReplayGuard>,
}

/// Ids remembered for replay protection at most (PROTOCOL.md §11.4 uses the same bound).
#[cfg(feature = "signing")]
const REPLAY_CAPACITY: usize = 1_000_000;

impl MessageSecurity {
    /// The settings of a validated configuration.
    pub(super) fn from_config(config: &Config) -> Self {
        let _ = config;
        MessageSecurity {
            #[cfg(feature = "encryption")]
            encryption: {
                use wsengine_layers::encrypt::EncryptionMode;
                match config.encryption.as_str() {
                    "required" => Some(EncryptionMode::Required),
                    "optional" => Some(EncryptionMode::Optional),
                    _ => None,
                }
            },
            #[cfg(feature = "signing")]
            signing: Signing::from_config(config),
        }
    }

    /// Signs `publication` once, when first encoded, if outbound signing is on.
    pub(super) fn sign_publication(&self, publication: Publication) -> Publication {
        #[cfg(feature = "signing")]
        if let Some(signing) = self.signing.as_ref().filter(|s| s.outbound) {
            return publication.with_signer(Arc::clone(&signing.signer) as _);
        }
        publication
    }

    /// Whether outbound application data is signed.
    #[cfg(all(test, feature = "signing"))]
    pub(super) fn signs_outbound(&self) -> bool {
        self.signing.as_ref().is_some_and(|s| s.outbound)
    }

    #[cfg(feature = "encryption")]
    pub(super) fn decrypt(
        &self,
        connection: &Arc<Connection>,
        limits: &Limits,
    ) -> Option<wsengine_layers::encrypt::DecryptLayer> {
        let mode = self.encryption?;
        Some(wsengine_layers::encrypt::DecryptLayer::new(connection).mode(mode).limits(limits.clone()))
    }

    #[cfg(not(feature = "encryption"))]
    pub(super) fn decrypt(&self, _: &Arc<Connection>, _: &Limits) -> Option<tower::layer::util::Identity> {
        None
    }

    #[cfg(feature = "encryption")]
    pub(super) fn encrypt(&self, connection: &Arc<Connection>) -> Option<wsengine_layers::encrypt::EncryptLayer> {
        let mode = self.encryption?;
        let required = mode == wsengine_layers::encrypt::EncryptionMode::Required;
        Some(wsengine_layers::encrypt::EncryptLayer::new(connection).required(required))
    }

    #[cfg(not(feature = "encryption"))]
    pub(super) fn encrypt(&self, _: &Arc<Connection>) -> Option<tower::layer::util::Identity> {
        None
    }

    #[cfg(feature = "signing")]
    pub(super) fn verify(&self, connection: &Arc<Connection>) -> Option<wsengine_layers::sign::VerifyLayer> {
        let signing = self.signing.as_ref()?;
        Some(
            wsengine_layers::sign::VerifyLayer::new(Arc::clone(&signing.signer), signing.mode, connection.user_id())
                .reject_invalid(signing.reject_invalid)
                .require_types(signing.require_types.clone())
                .max_clock_skew(signing.max_clock_skew)
                .replay_guard(Arc::clone(&signing.replay)),
        )
    }

    #[cfg(not(feature = "signing"))]
    pub(super) fn verify(&self, _: &Arc<Connection>) -> Option<tower::layer::util::Identity> {
        None
    }

    #[cfg(feature = "signing")]
    pub(super) fn sign(&self) -> Option<wsengine_layers::sign::SignLayer> {
        let signing = self.signing.as_ref().filter(|s| s.outbound)?;
        Some(wsengine_layers::sign::SignLayer::new(Arc::clone(&signing.signer)))
    }

    #[cfg(not(feature = "signing"))]
    pub(super) fn sign(&self) -> Option<tower::layer::util::Identity> {
        None
    }
}

#[cfg(feature = "signing")]
impl Signing {
    fn from_config(config: &Config) -> Option<Self> {
        use wsengine_layers::sign::{ReplayGuard, SignatureEncoding, Signer, SigningMode};
        let mode = match config.signing.as_str() {
            "verify" => SigningMode::Verify,
            "require" => SigningMode::Require,
            _ => return None,
        };
        // Config::validate has checked presence and length of the secrets.
        let mut signer = Signer::new(config.signing_secret.as_deref()?).ok()?;
        if let Some(previous) = &config.signing_previous_secret {
            signer = signer.previous_secret(previous).ok()?;
        }
        let encoding =
            if config.signing_encoding == "hex" { SignatureEncoding::Hex } else { SignatureEncoding::Base64 };
        Some(Signing {
            signer: Arc::new(signer.encoding(encoding).types(config.sign_types.clone())),
            mode,
            outbound: config.sign_outbound,
            reject_invalid: config.signing_reject_invalid,
            require_types: config.signing_require_types.clone(),
            max_clock_skew: config.signing_max_clock_skew,
            replay: Arc::new(ReplayGuard::new(config.signing_replay_window, REPLAY_CAPACITY)),
        })
    }
}

#[cfg(all(test, feature = "signing"))]
mod tests {
    use super::*;

    #[test]
    fn built_from_config() {
        let off = MessageSecurity::from_config(&Config { encryption: "off".into(), ..Config::default() });
        assert!(!off.signs_outbound());
        let config = Config { signing: "verify".into(), signing_secret: Some("s".repeat(32)), ..Config::default() };
        assert!(MessageSecurity::from_config(&config).signs_outbound());
        let quiet = Config { sign_outbound: false, ..config };
        assert!(!MessageSecurity::from_config(&quiet).signs_outbound());
    }
}
