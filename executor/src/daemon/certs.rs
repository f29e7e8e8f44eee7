//! Keeps the stage client certificate fresh: checked at every `reconcile_interval` (one
//! small file read and parse), reissued by the CA once less than a third of its lifetime is
//! left, or when it is missing, expired or unusable (a restored backup, a hand edit). The
//! stages read the file at each start; the daemon's own probes pick the new certificate up
//! through [`ClientCertSlot`]. No restart is involved.

use std::sync::Arc;

use tokio::sync::watch;

use super::Shared;
use crate::tls::ClientCertSlot;

/// Runs until `stop`. A failed renewal is logged at every check until one succeeds: with a
/// third of a 30-day lifetime left when renewals start, there are ten days to notice.
pub(super) async fn renew_client_cert(
    shared: Arc<Shared>,
    slot: Arc<ClientCertSlot>,
    mut stop: watch::Receiver<bool>,
) {
    let every = shared.config.reconcile_interval.0;
    // The slot still holds a certificate older than the one on disk.
    let mut stale = false;
    loop {
        let task_shared = shared.clone();
        let task_slot = slot.clone();
        let checked =
            tokio::task::spawn_blocking(move || check_once(&task_shared, &task_slot, stale));
        match checked.await {
            Ok(still_stale) => stale = still_stale,
            Err(e) => tracing::error!(error = %e, "the client certificate check panicked"),
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
    }
}

/// One check; returns whether the slot is still behind the file.
fn check_once(shared: &Shared, slot: &ClientCertSlot, stale: bool) -> bool {
    let dir = &shared.config.state_dir;
    let reload = match shared.ca.renew_client_cert(dir, shared.now()) {
        Ok(None) => stale,
        Ok(Some(renewed)) => {
            tracing::info!(
                reason = %renewed.reason,
                not_after = %renewed.validity.not_after,
                "renewed the stage client certificate"
            );
            true
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot renew the stage client certificate");
            stale
        }
    };
    if !reload {
        return false;
    }
    match slot.reload(dir) {
        Ok(()) => false,
        Err(e) => {
            tracing::error!(error = %e, "cannot load the renewed client certificate");
            true
        }
    }
}
