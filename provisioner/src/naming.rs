//! Names and tags: the stack tag every resource carries, the logical id that says which
//! resource of the stack it is, and the deterministic names of IAM roles, instance
//! profiles and the runner token parameter.
//!
//! Invariant: a resource is the stack's only if it carries `flotilla:stack = <stack>`;
//! `apply` finds what it created by these tags and `destroy` deletes nothing else.

/// Every resource the stack creates carries `flotilla:stack = <stack name>`.
pub(crate) const STACK_TAG: &str = "flotilla:stack";
/// Which resource of the stack this is (`vpc`, `subnet/private/us-east-1a`, `host/0`, ...).
pub(crate) const RESOURCE_TAG: &str = "flotilla:resource";
/// On runner hosts: SHA-256 of the user data they were launched with.
pub(crate) const USER_DATA_TAG: &str = "flotilla:user-data-sha256";
/// On runner hosts: SHA-256 of the flotilla binary their user data installs.
pub(crate) const BINARY_TAG: &str = "flotilla:binary-sha256";
/// On the runner token parameter: the GitLab runner id the token belongs to.
pub(crate) const RUNNER_ID_TAG: &str = "gitlab:runner-id";

/// The deterministic names of one stack's resources.
#[derive(Debug, Clone)]
pub(crate) struct Names {
    pub(crate) stack: String,
}

impl Names {
    pub(crate) fn new(stack: &str) -> Self {
        Self {
            stack: stack.to_owned(),
        }
    }

    /// The console `Name` tag for a logical id.
    pub(crate) fn name_tag(&self, logical: &str) -> String {
        format!("flotilla-{}-{}", self.stack, logical.replace('/', "-"))
    }

    /// IAM role and instance profile of the runner hosts (same name for both).
    pub(crate) fn runner_role(&self) -> String {
        format!("flotilla-{}-runner-host", self.stack)
    }

    /// IAM role and instance profile of the build machines (same name for both).
    pub(crate) fn build_role(&self) -> String {
        format!("flotilla-{}-build-machine", self.stack)
    }

    /// An `[[oidc.roles]]` deploy role (`name` as the stack file gives it); `deploy-`
    /// keeps it apart from the stack's own two roles.
    pub(crate) fn deploy_role(&self, name: &str) -> String {
        format!("flotilla-{}-deploy-{name}", self.stack)
    }

    /// The IAM path every deploy role of the stack is created under: how apply finds the
    /// ones the stack no longer lists (the stack tag still decides).
    pub(crate) fn deploy_role_path(&self) -> String {
        format!("/flotilla-deploy/{}/", self.stack)
    }

    /// The SSM parameter holding the GitLab runner authentication token.
    pub(crate) fn token_param(&self) -> String {
        format!("/flotilla/{}/runner-token", self.stack)
    }
}

/// Logical ids of the stack's EC2 resources.
pub(crate) mod logical {
    pub(crate) const VPC: &str = "vpc";
    pub(crate) const IGW: &str = "igw";
    pub(crate) const PUBLIC_RTB: &str = "rtb/public";
    pub(crate) const S3_ENDPOINT: &str = "vpce/s3";
    pub(crate) const RUNNER_SG: &str = "sg/runner-host";
    pub(crate) const BUILD_SG: &str = "sg/build-machine";
    /// The Client VPN endpoint (`[network.vpn]`) and its security group.
    pub(crate) const CLIENT_VPN: &str = "cvpn";
    pub(crate) const VPN_SG: &str = "sg/vpn-endpoint";

    pub(crate) fn public_subnet(zone: &str) -> String {
        format!("subnet/public/{zone}")
    }
    pub(crate) fn private_subnet(zone: &str) -> String {
        format!("subnet/private/{zone}")
    }
    pub(crate) fn vpn_subnet(zone: &str) -> String {
        format!("subnet/vpn/{zone}")
    }
    pub(crate) fn nat(zone: &str) -> String {
        format!("nat/{zone}")
    }
    pub(crate) fn eip(zone: &str) -> String {
        format!("eip/nat/{zone}")
    }
    pub(crate) fn private_rtb(zone: &str) -> String {
        format!("rtb/private/{zone}")
    }
    pub(crate) fn host(index: u32) -> String {
        format!("host/{index}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_iam_limits() {
        let n = Names::new(&"a".repeat(32));
        assert!(n.runner_role().len() <= 64);
        assert!(n.build_role().len() <= 64);
        assert_eq!(
            Names::new("ci").name_tag("subnet/private/us-east-1a"),
            "flotilla-ci-subnet-private-us-east-1a"
        );
    }
}
