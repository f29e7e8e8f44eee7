//! Images already there: a machine that just became ready (launched or started) pulls
//! its class's most used recent images ([`crate::image_usage`], learned from the jobs'
//! cleanups) while it is idle, so its first job finds them present (with `pull_policy =
//! always`, only a manifest check).
//!
//! Never in a lease's way: the machine is idle and leasable from the start, a job that
//! lands on it meanwhile just shares dockerd's pull of the same image. Pulls are
//! anonymous (a job's registry credentials belong to that job only): an image that needs
//! them is skipped and its job pulls it as before. One image at a time, each bounded by
//! [`PULL_TIMEOUT`]; a machine that leaves `idle`/`leased` stops the prefetch.

use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla_proto::api::MachineState;

use super::Shared;

/// Longest one prefetch pull may take.
pub(crate) const PULL_TIMEOUT: Duration = Duration::from_secs(600);

/// Starts the prefetch of `machine_id` (of `class`, at `address`) if its class has
/// images to prefetch; returns at once.
pub(super) fn spawn(shared: &Arc<Shared>, machine_id: &str, address: &str, class: &str) {
    let n = shared
        .config
        .classes
        .get(class)
        .map_or(0, |c| c.prefetch_images) as usize;
    if n == 0 {
        return;
    }
    let images = shared.pool().images_to_prefetch(class, n, shared.now());
    if images.is_empty() {
        return;
    }
    let (shared, machine_id, address) = (
        Arc::clone(shared),
        machine_id.to_owned(),
        address.to_owned(),
    );
    tokio::spawn(async move { run(&shared, &machine_id, &address, &images).await });
}

async fn run(shared: &Arc<Shared>, machine_id: &str, address: &str, images: &[String]) {
    let start = Instant::now();
    let mut pulled = 0usize;
    for image in images {
        let usable = shared
            .pool()
            .machines()
            .get(machine_id)
            .is_some_and(|m| matches!(m.state, MachineState::Idle | MachineState::Leased));
        if !usable {
            tracing::debug!(
                machine = machine_id,
                "prefetch stopped: the machine left service"
            );
            return;
        }
        match shared
            .machines
            .pull(machine_id, address, image, PULL_TIMEOUT)
            .await
        {
            Ok(()) => {
                pulled += 1;
                shared.metrics.prefetched("pulled");
            }
            Err(e) => {
                shared.metrics.prefetched("failed");
                tracing::info!(machine = machine_id, image = %image, error = %e, "prefetch skipped an image");
            }
        }
    }
    tracing::info!(
        machine = machine_id,
        pulled,
        of = images.len(),
        ms = start.elapsed().as_millis() as u64,
        "prefetched the class's images"
    );
}
