/* SPDX-License-Identifier: (GPL-2.0 OR Apache-2.0) */
/*
 * Fail-closed enrollment (design.md section 3). Attached to the parent cgroup of all pods
 * (kubepods, or the local runtime's pods folder), it runs after a pod's own programs: a
 * connection that capture rewrote to the in-pod loopback listener passes, and so does any
 * connection from a pod whose cgroup (or an ancestor of its container's cgroup) is in
 * nm_allowed_cgroups (verified, or opted out). Anything
 * else is refused with EPERM, so no traffic leaves a pod the mesh has not yet proven it captures.
 */
#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "nodemesh_abi.h"
#include "maps.h"

#define SOCK_STREAM 1

/*
 * A pod's containers live in child cgroups of the pod's cgroup (kubelet: kubepods[-QOS]/pod<UID>/
 * <container>; the local runtime: pods/<ns_name>), and the pod's cgroup is what the agent allows.
 * So the task's cgroup and each of its ancestors is looked up, from the root down: a pod's level
 * differs with its QoS class, and NM_GATE_MAX_LEVELS bounds the walk for the verifier. Level 0
 * is the root; past the task's own level the helper returns 0.
 */
#define NM_GATE_MAX_LEVELS 16

static __always_inline int allowed_cgroup(void)
{
	for (int level = 1; level < NM_GATE_MAX_LEVELS; level++) {
		__u64 id = bpf_get_current_ancestor_cgroup_id(level);

		if (id == 0)
			return 0;
		if (bpf_map_lookup_elem(&nm_allowed_cgroups, &id))
			return 1;
	}
	return 0;
}

static __always_inline int allowed_skb_cgroup(struct __sk_buff *skb)
{
	for (int level = 1; level < NM_GATE_MAX_LEVELS; level++) {
		__u64 id = bpf_skb_ancestor_cgroup_id(skb, level);

		if (id == 0)
			return 0;
		if (bpf_map_lookup_elem(&nm_allowed_cgroups, &id))
			return 1;
	}
	return 0;
}

SEC("cgroup/connect4")
int nm_gate4(struct bpf_sock_addr *ctx)
{
	if (ctx->type != SOCK_STREAM || (bpf_ntohl(ctx->user_ip4) >> 24) == 127)
		return 1;
	return allowed_cgroup();
}

SEC("cgroup/connect6")
int nm_gate6(struct bpf_sock_addr *ctx)
{
	__u32 a0 = ctx->user_ip6[0], a1 = ctx->user_ip6[1], a2 = ctx->user_ip6[2], a3 = ctx->user_ip6[3];

	if (ctx->type != SOCK_STREAM)
		return 1;
	if (a0 == 0 && a1 == 0 && a2 == 0 && a3 == bpf_htonl(1))
		return 1;
	if (a0 == 0 && a1 == 0 && a2 == bpf_htonl(0xffff) && (bpf_ntohl(a3) >> 24) == 127)
		return 1;
	return allowed_cgroup();
}

/*
 * Everything but TCP (UDP, ICMP, raw sockets, SCTP) meets no connect hook, or not always: an
 * unverified pod's packets of any other protocol are dropped as they leave its sockets, except
 * DNS (port 53, UDP and TCP) so that the pod can resolve names. TCP is the connect hooks'
 * business (above); loopback stays inside the pod. Allowed cgroups pass whole.
 */
#define ETH_P_IP 0x0800
#define ETH_P_IPV6 0x86DD
#define NEXTHDR_TCP 6
#define NEXTHDR_UDP 17

static __always_inline int allow_packet(__u8 proto, __u32 dport_off, struct __sk_buff *skb)
{
	__u16 dport = 0;

	if (proto == NEXTHDR_TCP)
		return 1;
	if (proto != NEXTHDR_UDP)
		return 0;
	if (bpf_skb_load_bytes(skb, dport_off, &dport, sizeof(dport)) != 0)
		return 0;
	return bpf_ntohs(dport) == 53;
}

SEC("cgroup_skb/egress")
int nm_gate_egress(struct __sk_buff *skb)
{
	if (allowed_skb_cgroup(skb))
		return 1;
	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		__u8 vihl = 0, proto = 0;
		__u32 daddr = 0;

		if (bpf_skb_load_bytes(skb, 0, &vihl, 1) || bpf_skb_load_bytes(skb, 9, &proto, 1) ||
		    bpf_skb_load_bytes(skb, 16, &daddr, 4))
			return 0;
		if ((bpf_ntohl(daddr) >> 24) == 127)
			return 1;
		/* UDP destination port: after the IPv4 header (IHL words), 2 bytes in. */
		return allow_packet(proto, (vihl & 0x0f) * 4 + 2, skb);
	}
	if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		__u8 next = 0;
		__u32 d[4] = {};

		if (bpf_skb_load_bytes(skb, 6, &next, 1) || bpf_skb_load_bytes(skb, 24, d, 16))
			return 0;
		if (d[0] == 0 && d[1] == 0 && d[2] == 0 && d[3] == bpf_htonl(1))
			return 1;
		/* Extension headers are not walked: a packet that has any is not DNS, and is dropped. */
		return allow_packet(next, 40 + 2, skb);
	}
	return 0;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
