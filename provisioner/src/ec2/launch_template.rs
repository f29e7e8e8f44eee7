//! Launch templates earlier versions of the provisioner created, one per machine class
//! (`flotilla-<stack>-<class>`). The daemon never launched from them: it sets every
//! setting it models per launch, so a template the provisioner owned could only drift
//! from the daemon's config. A class that needs what Flotilla does not model (placement
//! groups, capacity reservations, tenancy) names an operator-owned template in its
//! `launch_template` key instead. So the stack wants none: apply deletes the stack's own
//! (proven by the `flotilla:stack` tag) and destroy deletes any left.

use super::inventory::{Ec2Type, Inventory};
use crate::context::Ctx;
use crate::error::Result;
use crate::plan::Action;

const KIND: &str = "ec2:launch-template";

/// How the engine prunes and deletes this type.
pub(crate) const TYPE: Ec2Type = Ec2Type {
    desired,
    delete: |ctx, inv| Box::pin(delete(ctx, inv)),
};

/// None: every template of the stack is one an earlier version left.
fn desired(_: &Ctx<'_>) -> Vec<String> {
    Vec::new()
}

async fn delete(ctx: &Ctx<'_>, inv: &Inventory) -> Result<()> {
    for t in &inv.templates {
        let id = t.launch_template_id().unwrap_or_default();
        let name = t.launch_template_name().unwrap_or(id);
        if let Some(go) = ctx.change(Action::Delete, KIND, name, id) {
            ctx.aws
                .write(
                    go,
                    "ec2:DeleteLaunchTemplate",
                    ctx.aws
                        .ec2
                        .delete_launch_template()
                        .launch_template_id(id)
                        .send(),
                )
                .await?;
        }
    }
    Ok(())
}
