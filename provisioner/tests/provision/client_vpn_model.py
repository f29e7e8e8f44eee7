"""AWS Client VPN for moto, which has none (moto 5.2.1): a small model of the actions
flotilla-provision uses, registered into moto's EC2 query-API dispatch so the AWS SDK
talks to it exactly as to the rest of moto's EC2. Responses are built from plain dicts by
moto's own serializer (botocore's EC2 model: EC2's XML).

Modelled: endpoints per account and region, tagged from TagSpecifications (resource type
client-vpn-endpoint only); the VPC, subnets and security groups named must exist in
moto's EC2; client block /12 to /22; associations (one per subnet, subnet in the
endpoint's VPC), each adding the route to the VPC block as AWS does and taking it away
again; authorization rules; routes (target subnet must be associated); Modify of the
settings AWS lets change; deleting an endpoint that still has associations is refused.
Unknown ids and duplicates get EC2's error codes.

Not modelled: certificates (ACM is never asked; any ARN is taken), time (associations
are "associated" at once, a deleted endpoint is gone at once, no "deleting"), paging
(every Describe returns one page), connections, client configuration export, logs,
access groups (only all-groups rules), one association per zone.
"""

import datetime

from moto.core.responses import ActionResult
from moto.ec2.exceptions import EC2ClientError
from moto.ec2.responses import EC2Response
from moto.ec2.utils import random_id

# (account, region) -> {endpoint id: endpoint}
STATE = {}


def _state(resp):
    return STATE.setdefault((resp.current_account, resp.region), {})


def _bool(v, default=None):
    if v is None:
        return default
    if isinstance(v, bool):
        return v
    return str(v).lower() == "true"


def _endpoint(resp, eid):
    ep = _state(resp).get(eid)
    if ep is None:
        raise EC2ClientError(
            "InvalidClientVpnEndpointId.NotFound",
            f"The Client VPN endpoint ID '{eid}' does not exist",
        )
    return ep


def _prefix(cidr):
    try:
        return int(cidr.split("/")[1])
    except (IndexError, ValueError):
        return -1


def _update_status(ep):
    ep["Status"] = {
        "Code": "available" if ep["_assocs"] else "pending-associate"
    }


def _view(ep):
    return {k: v for k, v in ep.items() if not k.startswith("_")}


def create_client_vpn_endpoint(self):
    cidr = self._get_param("ClientCidrBlock")
    server = self._get_param("ServerCertificateArn")
    auth = self._get_param("AuthenticationOptions", [])
    logs = self._get_param("ConnectionLogOptions")
    if not cidr or not server or not auth or logs is None:
        raise EC2ClientError(
            "MissingParameter",
            "ClientCidrBlock, ServerCertificateArn, AuthenticationOptions and "
            "ConnectionLogOptions are required",
        )
    if not 12 <= _prefix(cidr) <= 22:
        raise EC2ClientError(
            "InvalidParameterValue", f"Invalid CIDR {cidr}: the prefix must be /12 to /22"
        )
    vpc_id = self._get_param("VpcId")
    groups = self._get_param("SecurityGroupIds", [])
    if groups and not vpc_id:
        raise EC2ClientError(
            "InvalidParameterCombination", "SecurityGroupIds requires VpcId"
        )
    if vpc_id:
        self.ec2_backend.get_vpc(vpc_id)
    for g in groups:
        self.ec2_backend.get_security_group_from_id(g)
    tags = []
    for spec in self._get_param("TagSpecifications", []):
        if spec.get("ResourceType") != "client-vpn-endpoint":
            raise EC2ClientError(
                "InvalidParameterValue",
                f"'{spec.get('ResourceType')}' is not a valid taggable resource type "
                "for this operation.",
            )
        tags.extend(spec.get("Tags", []))
    auth_out = []
    for a in auth:
        if a.get("Type") != "certificate-authentication":
            raise EC2ClientError(
                "InvalidParameterValue", "only certificate-authentication is modelled"
            )
        chain = (a.get("MutualAuthentication") or {}).get("ClientRootCertificateChainArn")
        auth_out.append(
            {
                "Type": "certificate-authentication",
                "MutualAuthentication": {"ClientRootCertificateChain": chain},
            }
        )
    eid = random_id("cvpn-endpoint")
    ep = {
        "ClientVpnEndpointId": eid,
        "Description": self._get_param("Description", ""),
        "CreationTime": datetime.datetime.utcnow().strftime("%Y-%m-%dT%H:%M:%S"),
        "DnsName": f"*.{eid}.prod.clientvpn.{self.region}.amazonaws.com",
        "ClientCidrBlock": cidr,
        "DnsServers": self._get_param("DnsServers", []),
        "SplitTunnel": _bool(self._get_param("SplitTunnel"), False),
        "VpnProtocol": "openvpn",
        "TransportProtocol": self._get_param("TransportProtocol", "udp"),
        "VpnPort": int(self._get_param("VpnPort", 443)),
        "ServerCertificateArn": server,
        "AuthenticationOptions": auth_out,
        "ConnectionLogOptions": {"Enabled": _bool(logs.get("Enabled"), False)},
        "Tags": tags,
        "SecurityGroupIds": groups,
        "VpcId": vpc_id,
        "_assocs": [],
        "_rules": [],
        "_routes": [],
    }
    _update_status(ep)
    _state(self)[eid] = ep
    return ActionResult(
        {"ClientVpnEndpointId": eid, "Status": ep["Status"], "DnsName": ep["DnsName"]}
    )


def describe_client_vpn_endpoints(self):
    ids = self._get_param("ClientVpnEndpointIds", [])
    eps = [_endpoint(self, i) for i in ids] if ids else list(_state(self).values())
    for f in self._get_param("Filters", []):
        name, values = f.get("Name"), f.get("Values", [])
        if name == "endpoint-id":
            eps = [e for e in eps if e["ClientVpnEndpointId"] in values]
        elif name == "transport-protocol":
            eps = [e for e in eps if e["TransportProtocol"] in values]
        else:
            raise EC2ClientError(
                "InvalidParameterValue", f"The filter '{name}' is invalid"
            )
    return ActionResult({"ClientVpnEndpoints": [_view(e) for e in eps]})


def modify_client_vpn_endpoint(self):
    ep = _endpoint(self, self._get_param("ClientVpnEndpointId"))
    if self._get_param("ServerCertificateArn"):
        ep["ServerCertificateArn"] = self._get_param("ServerCertificateArn")
    dns = self._get_param("DnsServers")
    if dns is not None:
        enabled = _bool(dns.get("Enabled"), True)
        ep["DnsServers"] = dns.get("CustomDnsServers", []) if enabled else []
    if self._get_param("VpnPort") is not None:
        ep["VpnPort"] = int(self._get_param("VpnPort"))
    if self._get_param("SplitTunnel") is not None:
        ep["SplitTunnel"] = _bool(self._get_param("SplitTunnel"))
    if self._get_param("Description") is not None:
        ep["Description"] = self._get_param("Description")
    groups = self._get_param("SecurityGroupIds", [])
    if groups:
        vpc_id = self._get_param("VpcId") or ep["VpcId"]
        if not vpc_id:
            raise EC2ClientError(
                "InvalidParameterCombination", "SecurityGroupIds requires VpcId"
            )
        for g in groups:
            self.ec2_backend.get_security_group_from_id(g)
        ep["SecurityGroupIds"], ep["VpcId"] = groups, vpc_id
    return ActionResult({"Return": True})


def delete_client_vpn_endpoint(self):
    eid = self._get_param("ClientVpnEndpointId")
    ep = _endpoint(self, eid)
    if ep["_assocs"]:
        raise EC2ClientError(
            "IncorrectState",
            f"Client VPN endpoint {eid} still has associated target networks",
        )
    del _state(self)[eid]
    return ActionResult({"Status": {"Code": "deleting"}})


def associate_client_vpn_target_network(self):
    ep = _endpoint(self, self._get_param("ClientVpnEndpointId"))
    subnet_id = self._get_param("SubnetId")
    try:
        subnet = self.ec2_backend.get_subnet(subnet_id)
    except Exception:
        raise EC2ClientError(
            "InvalidSubnetID.NotFound", f"The subnet ID '{subnet_id}' does not exist"
        )
    if ep["VpcId"] and subnet.vpc_id != ep["VpcId"]:
        raise EC2ClientError(
            "InvalidParameterValue",
            f"Subnet {subnet_id} is not in the endpoint's VPC {ep['VpcId']}",
        )
    if any(a["TargetNetworkId"] == subnet_id for a in ep["_assocs"]):
        raise EC2ClientError(
            "InvalidClientVpnDuplicateAssociationException",
            f"Subnet {subnet_id} is already associated",
        )
    ep["VpcId"] = subnet.vpc_id
    if not ep["SecurityGroupIds"]:
        ep["SecurityGroupIds"] = [self.ec2_backend.get_default_security_group(subnet.vpc_id).id]
    assoc = {
        "AssociationId": random_id("cvpn-assoc"),
        "VpcId": subnet.vpc_id,
        "TargetNetworkId": subnet_id,
        "ClientVpnEndpointId": ep["ClientVpnEndpointId"],
        "Status": {"Code": "associated"},
        "SecurityGroups": list(ep["SecurityGroupIds"]),
    }
    ep["_assocs"].append(assoc)
    vpc = self.ec2_backend.get_vpc(subnet.vpc_id)
    ep["_routes"].append(
        {
            "ClientVpnEndpointId": ep["ClientVpnEndpointId"],
            "DestinationCidr": vpc.cidr_block,
            "TargetSubnet": subnet_id,
            "Type": "Nat",
            "Origin": "associate",
            "Status": {"Code": "active"},
            "Description": "Default Route",
        }
    )
    _update_status(ep)
    return ActionResult(
        {"AssociationId": assoc["AssociationId"], "Status": assoc["Status"]}
    )


def disassociate_client_vpn_target_network(self):
    ep = _endpoint(self, self._get_param("ClientVpnEndpointId"))
    aid = self._get_param("AssociationId")
    found = [a for a in ep["_assocs"] if a["AssociationId"] == aid]
    if not found:
        raise EC2ClientError(
            "InvalidClientVpnAssociationId.NotFound",
            f"The association ID '{aid}' does not exist",
        )
    subnet = found[0]["TargetNetworkId"]
    ep["_assocs"] = [a for a in ep["_assocs"] if a["AssociationId"] != aid]
    ep["_routes"] = [r for r in ep["_routes"] if r["TargetSubnet"] != subnet]
    _update_status(ep)
    return ActionResult({"AssociationId": aid, "Status": {"Code": "disassociating"}})


def describe_client_vpn_target_networks(self):
    ep = _endpoint(self, self._get_param("ClientVpnEndpointId"))
    wanted = self._get_param("AssociationIds", [])
    nets = [a for a in ep["_assocs"] if not wanted or a["AssociationId"] in wanted]
    return ActionResult({"ClientVpnTargetNetworks": nets})


def authorize_client_vpn_ingress(self):
    ep = _endpoint(self, self._get_param("ClientVpnEndpointId"))
    cidr = self._get_param("TargetNetworkCidr")
    all_groups = _bool(self._get_param("AuthorizeAllGroups"), False)
    group = self._get_param("AccessGroupId")
    if all_groups == bool(group):
        raise EC2ClientError(
            "InvalidParameterCombination",
            "give exactly one of AuthorizeAllGroups and AccessGroupId",
        )
    if any(r["DestinationCidr"] == cidr and r.get("GroupId") == group for r in ep["_rules"]):
        raise EC2ClientError(
            "InvalidClientVpnDuplicateAuthorizationRule",
            f"An authorization rule for {cidr} already exists",
        )
    rule = {
        "ClientVpnEndpointId": ep["ClientVpnEndpointId"],
        "Description": self._get_param("Description", ""),
        "AccessAll": all_groups,
        "DestinationCidr": cidr,
        "Status": {"Code": "active"},
    }
    if group:
        rule["GroupId"] = group
    ep["_rules"].append(rule)
    return ActionResult({"Status": {"Code": "authorizing"}})


def revoke_client_vpn_ingress(self):
    ep = _endpoint(self, self._get_param("ClientVpnEndpointId"))
    cidr = self._get_param("TargetNetworkCidr")
    all_groups = _bool(self._get_param("RevokeAllGroups"), False)
    group = self._get_param("AccessGroupId")
    keep = [
        r
        for r in ep["_rules"]
        if r["DestinationCidr"] != cidr or not (all_groups or r.get("GroupId") == group)
    ]
    if len(keep) == len(ep["_rules"]):
        raise EC2ClientError(
            "InvalidClientVpnEndpointAuthorizationRuleNotFound",
            f"No authorization rule for {cidr}",
        )
    ep["_rules"] = keep
    return ActionResult({"Status": {"Code": "revoking"}})


def describe_client_vpn_authorization_rules(self):
    ep = _endpoint(self, self._get_param("ClientVpnEndpointId"))
    return ActionResult({"AuthorizationRules": list(ep["_rules"])})


def create_client_vpn_route(self):
    ep = _endpoint(self, self._get_param("ClientVpnEndpointId"))
    cidr = self._get_param("DestinationCidrBlock")
    subnet = self._get_param("TargetVpcSubnetId")
    if not any(a["TargetNetworkId"] == subnet for a in ep["_assocs"]):
        raise EC2ClientError(
            "InvalidClientVpnActiveAssociationNotFound",
            f"Subnet {subnet} is not associated with the endpoint",
        )
    if any(r["DestinationCidr"] == cidr and r["TargetSubnet"] == subnet for r in ep["_routes"]):
        raise EC2ClientError(
            "InvalidClientVpnDuplicateRoute", f"A route to {cidr} via {subnet} exists"
        )
    ep["_routes"].append(
        {
            "ClientVpnEndpointId": ep["ClientVpnEndpointId"],
            "DestinationCidr": cidr,
            "TargetSubnet": subnet,
            "Type": "Nat",
            "Origin": "add-route",
            "Status": {"Code": "active"},
            "Description": self._get_param("Description", ""),
        }
    )
    return ActionResult({"Status": {"Code": "creating"}})


def delete_client_vpn_route(self):
    ep = _endpoint(self, self._get_param("ClientVpnEndpointId"))
    cidr = self._get_param("DestinationCidrBlock")
    subnet = self._get_param("TargetVpcSubnetId")
    keep = [
        r
        for r in ep["_routes"]
        if not (r["DestinationCidr"] == cidr and (not subnet or r["TargetSubnet"] == subnet))
    ]
    if len(keep) == len(ep["_routes"]):
        raise EC2ClientError("InvalidClientVpnRouteNotFound", f"No route to {cidr}")
    ep["_routes"] = keep
    return ActionResult({"Status": {"Code": "deleting"}})


def describe_client_vpn_routes(self):
    ep = _endpoint(self, self._get_param("ClientVpnEndpointId"))
    return ActionResult({"Routes": list(ep["_routes"])})


for _f in [
    create_client_vpn_endpoint,
    describe_client_vpn_endpoints,
    modify_client_vpn_endpoint,
    delete_client_vpn_endpoint,
    associate_client_vpn_target_network,
    disassociate_client_vpn_target_network,
    describe_client_vpn_target_networks,
    authorize_client_vpn_ingress,
    revoke_client_vpn_ingress,
    describe_client_vpn_authorization_rules,
    create_client_vpn_route,
    delete_client_vpn_route,
    describe_client_vpn_routes,
]:
    setattr(EC2Response, _f.__name__, _f)
