// zddd's sk_lookup program: new TCP connections to the listen port are handed to the active
// target's listening socket. No packet is rewritten: the connection keeps the listen port end
// to end, and the application accepts it on its own listener.
//
// Compiled by zddd with bcc (zddd/backends/sk_lookup.py), with these -D values:
//   LISTEN_PORT   the steering port (host order)
//   NTARGETS      number of targets (their order is zddd's: sorted by name)
//   SLOTS         listening sockets kept per target
//   FLOW_ENTRIES  size of the flow map
//
// The kernel runs this on every socket lookup for which no established socket matched (SYNs,
// in practice); established connections never reach it, so a switch never moves them.

#include <uapi/linux/bpf.h>
#include <linux/in.h>

// Which target new connections go to: 0 = off (nothing is assigned, so the connection is
// refused because nothing listens on the listen port), i + 1 = target i. A switch is one
// store into this element, which zddd maps into its memory (BPF_F_MMAPABLE).
BPF_F_TABLE("array", u32, u32, zddd_active, 1, BPF_F_MMAPABLE);

// The layout stamp, written by zddd when it builds the layout and read back before adopting.
// The program does not read it; it is here so it is created with the other maps.
struct zddd_meta {
    u32 magic;
    u32 version;
    u32 listen_port;
    u32 ntargets;
    u32 slots;
    u32 flow_entries;
};
BPF_TABLE("array", u32, struct zddd_meta, zddd_meta, 1);

// The targets' listening sockets: target i's are at i * SLOTS + 0 .. SLOTS - 1. 8-byte values,
// so a lookup from user space returns the socket's cookie (compared with the current listeners).
BPF_TABLE("sockmap", u32, u64, zddd_sockets, NTARGETS * SLOTS);

// Which target each connection was assigned to, by its addresses, so zddd can count
// established connections on the listen port per target (they all have the same local port).
struct zddd_flow {
    u32 remote_ip[4];  // IPv4: [0] only; network order
    u32 local_ip[4];
    u16 remote_port;   // network order
    u16 family;
};
BPF_TABLE("lru_hash", struct zddd_flow, u32, zddd_flows, FLOW_ENTRIES);

// New connections assigned, per target.
BPF_TABLE("percpu_array", u32, u64, zddd_steered, NTARGETS);

// The connection's local address, copied out of the context once: the verifier rejects a
// context access through a pointer the compiler has offset (ctx + 40) and kept in a register.
struct zddd_local {
    u32 family;
    u32 ip4;
    u32 ip6[4];
};

// 1: the socket is bound to the connection's local address; 2: bound to the wildcard address
// of a family that can take the connection; 0: neither (another address: never used).
static __always_inline int address_match(const struct zddd_local *local, struct bpf_sock *sk)
{
    if (sk->family == AF_INET) {
        if (local->family != AF_INET)
            return 0;
        if (sk->src_ip4 == local->ip4)
            return 1;
        return sk->src_ip4 == 0 ? 2 : 0;
    }
    u32 a0 = sk->src_ip6[0], a1 = sk->src_ip6[1], a2 = sk->src_ip6[2], a3 = sk->src_ip6[3];
    if ((a0 | a1 | a2 | a3) == 0)
        return 2;  // a v6-only socket refuses IPv4 in bpf_sk_assign, and the next one is tried
    if (local->family == AF_INET6)
        return (a0 == local->ip6[0] && a1 == local->ip6[1] &&
                a2 == local->ip6[2] && a3 == local->ip6[3]) ? 1 : 0;
    // An IPv4 connection on a socket bound to the IPv4-mapped form of its address.
    return (a0 == 0 && a1 == 0 && a2 == bpf_htonl(0xffff) && a3 == local->ip4) ? 1 : 0;
}

int zddd_sk_lookup(struct bpf_sk_lookup *ctx)
{
    if (ctx->protocol != IPPROTO_TCP || ctx->local_port != LISTEN_PORT)
        return SK_PASS;
    u32 zero = 0;
    u32 *active = zddd_active.lookup(&zero);
    // Read once: zddd stores a new value through its mapping of the map at any moment.
    u32 chosen = active ? *(volatile u32 *)active : 0;
    if (chosen == 0 || chosen > NTARGETS)
        return SK_PASS;
    u32 target = chosen - 1;

    struct zddd_local local = {};
    local.family = ctx->family;
    if (local.family == AF_INET) {
        local.ip4 = ctx->local_ip4;
    } else {
        local.ip6[0] = ctx->local_ip6[0];
        local.ip6[1] = ctx->local_ip6[1];
        local.ip6[2] = ctx->local_ip6[2];
        local.ip6[3] = ctx->local_ip6[3];
    }

    // Sockets bound to the connection's own address first, then wildcard ones.
    int assigned = 0;
    for (int want = 1; want <= 2 && !assigned; want++) {
        for (u32 slot = 0; slot < SLOTS; slot++) {
            u32 key = target * SLOTS + slot;
            // bcc 0.26 rewrites .lookup() into the raw helper for any table; for a sockmap the
            // kernel returns the socket (a reference to release), not the u64 declared.
            struct bpf_sock *sk = (struct bpf_sock *)zddd_sockets.lookup(&key);
            if (!sk)
                continue;
            int ok = address_match(&local, sk) == want && bpf_sk_assign(ctx, sk, 0) == 0;
            bpf_sk_release(sk);
            if (ok) {
                assigned = 1;
                break;
            }
        }
    }
    if (!assigned)
        return SK_PASS;  // no listener of the target takes it: refused, as its vhost would

    struct zddd_flow flow = {};
    flow.family = local.family;
    flow.remote_port = ctx->remote_port;
    if (local.family == AF_INET) {
        flow.remote_ip[0] = ctx->remote_ip4;
        flow.local_ip[0] = local.ip4;
    } else {
        flow.remote_ip[0] = ctx->remote_ip6[0];
        flow.remote_ip[1] = ctx->remote_ip6[1];
        flow.remote_ip[2] = ctx->remote_ip6[2];
        flow.remote_ip[3] = ctx->remote_ip6[3];
        flow.local_ip[0] = local.ip6[0];
        flow.local_ip[1] = local.ip6[1];
        flow.local_ip[2] = local.ip6[2];
        flow.local_ip[3] = local.ip6[3];
    }
    zddd_flows.update(&flow, &target);
    u64 *steered = zddd_steered.lookup(&target);
    if (steered)
        *steered += 1;  // per-CPU: no other writer
    return SK_PASS;
}
