/* SPDX-License-Identifier: (GPL-2.0 OR Apache-2.0) */
/*
 * Inbound steering (design.md section 3). Attached with sk_lookup to each enrolled pod's
 * network namespace: a new TCP connection to the pod address is handed to the agent's in-pod
 * inbound listener, found in nm_pod_listeners by {family, role, pod address}.
 * Loopback and self-addressed connections pass, so the proxy can deliver to the application from
 * inside the pod without being steered again. No listener registered for the address (agent
 * stopped, an address of the pod the agent does not know): fail open (the kernel's normal
 * lookup), unless nm_settings says strict (fail-closed enrollment): then the connection is dropped.
 */
#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "nodemesh_abi.h"
#include "maps.h"

static __always_inline int strict(void)
{
	__u32 zero = 0;
	__u32 *flags = bpf_map_lookup_elem(&nm_settings, &zero);

	return flags && (*flags & NM_SETTING_STRICT_INBOUND);
}

static __always_inline int is_proxy_port(__u32 port)
{
	return port == NM_PORT_OUTBOUND || port == NM_PORT_INBOUND ||
	       port == NM_PORT_INBOUND_TUNNEL || port == NM_PORT_DNS;
}

static __always_inline int is_delivery(struct bpf_sk_lookup *ctx)
{
	struct nm_bypass_key key = {};

	key.family = ctx->family;
	key.remote_port = bpf_ntohs(ctx->remote_port);
	key.local_port = (__u16)ctx->local_port;
	if (ctx->family == NM_AF_INET) {
		key.remote_addr[0] = ctx->remote_ip4;
		key.local_addr[0] = ctx->local_ip4;
	} else {
		key.remote_addr[0] = ctx->remote_ip6[0];
		key.remote_addr[1] = ctx->remote_ip6[1];
		key.remote_addr[2] = ctx->remote_ip6[2];
		key.remote_addr[3] = ctx->remote_ip6[3];
		key.local_addr[0] = ctx->local_ip6[0];
		key.local_addr[1] = ctx->local_ip6[1];
		key.local_addr[2] = ctx->local_ip6[2];
		key.local_addr[3] = ctx->local_ip6[3];
	}
	return bpf_map_lookup_elem(&nm_inbound_bypass, &key) != 0;
}

SEC("sk_lookup")
int nm_sk_lookup(struct bpf_sk_lookup *ctx)
{
	struct nm_listener_key key = {};
	struct bpf_sock *sk;
	long err;

	if (ctx->protocol != IPPROTO_TCP || is_proxy_port(ctx->local_port))
		return SK_PASS;
	if (is_delivery(ctx))
		return SK_PASS;

	key.family = ctx->family;
	key.role = NM_ROLE_INBOUND;
	if (ctx->family == NM_AF_INET) {
		if ((bpf_ntohl(ctx->local_ip4) >> 24) == 127 || ctx->local_ip4 == ctx->remote_ip4)
			return SK_PASS;
		key.addr[0] = ctx->local_ip4;
	} else {
		if (ctx->local_ip6[0] == ctx->remote_ip6[0] && ctx->local_ip6[1] == ctx->remote_ip6[1] &&
		    ctx->local_ip6[2] == ctx->remote_ip6[2] && ctx->local_ip6[3] == ctx->remote_ip6[3])
			return SK_PASS;
		key.addr[0] = ctx->local_ip6[0];
		key.addr[1] = ctx->local_ip6[1];
		key.addr[2] = ctx->local_ip6[2];
		key.addr[3] = ctx->local_ip6[3];
	}

	sk = bpf_map_lookup_elem(&nm_pod_listeners, &key);
	if (!sk)
		return strict() ? SK_DROP : SK_PASS;
	err = bpf_sk_assign(ctx, sk, 0);
	bpf_sk_release(sk);
	if (err)
		return strict() ? SK_DROP : SK_PASS;
	return SK_PASS;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
