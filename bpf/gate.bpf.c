/* SPDX-License-Identifier: (GPL-2.0 OR Apache-2.0) */
/*
 * Fail-closed enrollment (design.md section 3). Attached to the parent cgroup of all pods
 * (kubepods, or the local runtime's pods folder), it runs after a pod's own programs: a
 * connection that capture rewrote to the in-pod loopback listener passes, and so does any
 * connection from a pod whose cgroup is in nm_allowed_cgroups (verified, or opted out). Anything
 * else is refused with EPERM, so no traffic leaves a pod the mesh has not yet proven it captures.
 */
#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "nodemesh_abi.h"
#include "maps.h"

#define SOCK_STREAM 1

static __always_inline int allowed_cgroup(void)
{
	__u64 id = bpf_get_current_cgroup_id();

	return bpf_map_lookup_elem(&nm_allowed_cgroups, &id) != 0;
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

char LICENSE[] SEC("license") = "Dual BSD/GPL";
