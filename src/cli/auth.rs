//! How a client finds and proves itself to a coordinator: the admin token from `--token` (or
//! `$SWARM_TOKEN`), else the one `swarm up` keeps on this machine; `--coordinator` overrides the
//! addresses the token lists.

use anyhow::Context;
use std::path::PathBuf;
use swarm_coordinator::identity::{ClusterIdentity, read_token};
use swarm_proto::trust::{self, Client, Token, TokenKind};

/// Where `swarm up` with the default data directory keeps the admin token.
pub fn local_admin_token_path() -> PathBuf {
    crate::default_data_dir().join(ClusterIdentity::DIR).join(ClusterIdentity::ADMIN_TOKEN)
}

/// The admin token to use, and whether the user gave it (`--token`/`$SWARM_TOKEN`) rather than
/// it being found on this machine. `None`: there is none.
pub fn admin_token(given: Option<&str>, coordinator: Option<&str>) -> anyhow::Result<Option<(Token, bool)>> {
    let (mut token, explicit) = match given {
        Some(t) => (Token::decode_kind(t, TokenKind::Admin).context("--token")?, true),
        None => {
            let p = local_admin_token_path();
            if !p.is_file() {
                return Ok(None);
            }
            (read_token(&p, TokenKind::Admin)?, false)
        }
    };
    if let Some(addr) = coordinator {
        token.addrs = vec![addr.to_string()];
    }
    Ok(Some((token, explicit)))
}

/// Like [`admin_token`], for commands that need a coordinator: no token is an error saying
/// where to get one.
pub fn require_admin_token(given: Option<&str>, coordinator: Option<&str>) -> anyhow::Result<Token> {
    admin_token(given, coordinator)?.map(|(t, _)| t).with_context(|| {
        format!(
            "no admin token: pass --token TOKEN or set SWARM_TOKEN (`swarm token` on the coordinator's machine prints it; there it is read from {})",
            local_admin_token_path().display()
        )
    })
}

/// A client presenting the admin secret to the first of the token's addresses that answers.
pub async fn admin_client(token: &Token) -> anyhow::Result<Client> {
    let (channel, _) = swarm_proto::discovery::connect(&token.addrs, token.pin).await?;
    Ok(trust::client(channel, &token.secret))
}
