/* SPDX-License-Identifier: (GPL-2.0 OR Apache-2.0) */
/*
 * Outbound capture (design.md section 3). Attached to each enrolled pod's cgroup:
 *  - cgroup/connect4, cgroup/connect6 remember where the application wanted to go, keyed by
 *    socket cookie, and point the socket at the in-pod outbound listener instead;
 *  - sockops, on ACTIVE_ESTABLISHED, re-keys that entry by {netns cookie, local port, family},
 *    which is what the proxy can see of an accepted connection.
 * The connect hooks run before the route lookup, so a pod needs no route to service addresses.
 */
#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "nodemesh_abi.h"
#include "maps.h"

#define SOCK_STREAM 1
/* Multipath TCP: relayed like TCP (the client falls back to plain TCP with the proxy's listener). */
#define NM_IPPROTO_MPTCP 262

static __always_inline int tcp_like(struct bpf_sock_addr *ctx)
{
	return ctx->protocol == IPPROTO_TCP || ctx->protocol == NM_IPPROTO_MPTCP;
}

/* Fixed at load time (libbpf-bootstrap style): the agent may override before load. */
const volatile __u16 outbound_port = NM_PORT_OUTBOUND;

static __always_inline void count(__u32 what)
{
	__u64 *n = bpf_map_lookup_elem(&nm_counters, &what);

	if (n)
		__sync_fetch_and_add(n, 1);
}

/*
 * A stream socket that is not TCP (SCTP's one-to-one style) cannot be relayed by the proxy, and
 * must not leave the mesh either: its connect is refused (EPERM) and counted.
 */
static __always_inline int refuse_stream(struct bpf_sock_addr *ctx)
{
	if (ctx->type == SOCK_STREAM && !tcp_like(ctx)) {
		count(NM_COUNT_NON_TCP_STREAM);
		return 1;
	}
	return 0;
}

static __always_inline int skip_socket(struct bpf_sock_addr *ctx)
{
	struct bpf_sock *sk;

	if (ctx->type != SOCK_STREAM || !tcp_like(ctx))
		return 1;
	sk = ctx->sk;
	/*
	 * No mark is trusted here: a pod's process may set SO_MARK itself (CAP_NET_RAW is enough
	 * since 5.17) and would leave the mesh. The proxy's own sockets never reach these programs:
	 * they are made by the agent's threads, which live in the agent's cgroup, not a pod's.
	 */
	if (!sk)
		return 1;
	return 0;
}

static __always_inline int is_v4_local(__u32 addr_be)
{
	__u32 a = bpf_ntohl(addr_be);

	return a == 0 || (a >> 24) == 127;
}

static __always_inline void remember(struct bpf_sock_addr *ctx, struct nm_addr *orig)
{
	__u64 cookie = bpf_get_socket_cookie(ctx);

	bpf_map_update_elem(&nm_cookie_dst, &cookie, orig, BPF_ANY);
}

SEC("cgroup/connect4")
int nm_connect4(struct bpf_sock_addr *ctx)
{
	struct nm_addr orig = {};
	__u32 dst = ctx->user_ip4;

	if (is_v4_local(dst))
		return 1;
	if (refuse_stream(ctx))
		return 0;
	if (skip_socket(ctx))
		return 1;

	orig.family = NM_AF_INET;
	orig.port = (__u16)ctx->user_port;
	orig.addr[0] = dst;
	remember(ctx, &orig);

	ctx->user_ip4 = bpf_htonl(0x7f000001);
	/* user_port must be written 4 bytes wide; the port sits in its low 16 bits. */
	ctx->user_port = (__u32)bpf_htons(outbound_port);
	return 1;
}

SEC("cgroup/connect6")
int nm_connect6(struct bpf_sock_addr *ctx)
{
	struct nm_addr orig = {};
	__u32 a0 = ctx->user_ip6[0], a1 = ctx->user_ip6[1];
	__u32 a2 = ctx->user_ip6[2], a3 = ctx->user_ip6[3];

	/* Loopback (::1, ::ffff:127.x) stays in the pod; everything else goes through the checks. */
	if ((a0 == 0 && a1 == 0 && a2 == 0 && (a3 == 0 || a3 == bpf_htonl(1))) ||
	    (a0 == 0 && a1 == 0 && a2 == bpf_htonl(0xffff) && is_v4_local(a3)))
		return 1;
	if (refuse_stream(ctx))
		return 0;
	if (skip_socket(ctx))
		return 1;

	orig.port = (__u16)ctx->user_port;
	if (a0 == 0 && a1 == 0 && a2 == bpf_htonl(0xffff)) {
		/* A dual-stack socket dialing an IPv4 address: the listener sees IPv4. */
		if (is_v4_local(a3))
			return 1;
		orig.family = NM_AF_INET;
		orig.addr[0] = a3;
		remember(ctx, &orig);
		ctx->user_ip6[3] = bpf_htonl(0x7f000001);
	} else {
		if (a0 == 0 && a1 == 0 && a2 == 0 && (a3 == 0 || a3 == bpf_htonl(1)))
			return 1;
		orig.family = NM_AF_INET6;
		orig.addr[0] = a0;
		orig.addr[1] = a1;
		orig.addr[2] = a2;
		orig.addr[3] = a3;
		remember(ctx, &orig);
		ctx->user_ip6[0] = 0;
		ctx->user_ip6[1] = 0;
		ctx->user_ip6[2] = 0;
		ctx->user_ip6[3] = bpf_htonl(1);
	}
	ctx->user_port = (__u32)bpf_htons(outbound_port);
	return 1;
}

SEC("sockops")
int nm_sockops(struct bpf_sock_ops *skops)
{
	struct nm_orig_key key = {};
	struct nm_addr *orig;
	__u64 cookie;

	if (skops->op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB)
		return 1;

	cookie = bpf_get_socket_cookie(skops);
	orig = bpf_map_lookup_elem(&nm_cookie_dst, &cookie);
	if (!orig)
		return 1;

	key.netns_cookie = bpf_get_netns_cookie(skops);
	key.port = (__u16)skops->local_port;
	key.family = skops->family == NM_AF_INET6 && skops->remote_ip6[0] == 0 &&
				     skops->remote_ip6[1] == 0 &&
				     skops->remote_ip6[2] == bpf_htonl(0xffff) ?
			     NM_AF_INET :
			     (__u16)skops->family;
	bpf_map_update_elem(&nm_orig_dst, &key, orig, BPF_ANY);
	bpf_map_delete_elem(&nm_cookie_dst, &cookie);
	return 1;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
