// zddd's sk_lookup program: new TCP connections to a service's listen port are handed to a
// listening socket of one of its targets. No packet is rewritten: the connection keeps the
// listen port end to end, and the application accepts it on its own listener.
//
// Compiled by zddd with bcc (zddd/backends/sk_lookup.py), with these -D values:
//   MAX_SERVICES  service slots (the services are runtime data: a listen port -> slot map)
//   SLOTS         listening sockets kept per (service, target)
//   FLOW_ENTRIES  size of the flow map
// Nothing of any one service is compiled in: adding or removing a service is map inserts and
// deletes, and a switch is one store.
//
// The kernel runs this on every socket lookup for which no established socket matched (SYNs,
// in practice); established connections never reach it, so a switch never moves them.

#include <uapi/linux/bpf.h>
#include <linux/in.h>

// Targets, in zddd's order (sorted by name): a service's target t of slot s is at s * 2 + t in
// the socket map (times SLOTS), the flow map's values and the counters.
#define NTARGETS 2
#define TARGET_BACKUP 0
#define TARGET_MAIN 1

// Listen port (host order) -> service slot. A port not in it is not zddd's: passed on.
BPF_TABLE("hash", u32, u32, zddd_services, MAX_SERVICES);

// Per service slot, where its new connections go: 0 = off (nothing is assigned, so the
// connection is refused because nothing listens on the listen port), 1 + w = main with
// probability w percent (w 0..100), else backup. A switch is one store into this array, which
// zddd maps into its memory (BPF_F_MMAPABLE).
BPF_F_TABLE("array", u32, u32, zddd_active, MAX_SERVICES, BPF_F_MMAPABLE);

// The layout stamp, written by zddd when it builds the layout and read back before adopting.
// The program does not read it; it is here so it is created with the other maps.
struct zddd_meta {
    u32 magic;
    u32 version;
    u32 max_services;
    u32 ntargets;
    u32 slots;
    u32 flow_entries;
};
BPF_TABLE("array", u32, struct zddd_meta, zddd_meta, 1);

// The targets' listening sockets: (slot, target)'s are at (slot * NTARGETS + target) * SLOTS +
// 0 .. SLOTS - 1. 8-byte values, so a lookup from user space returns the socket's cookie
// (compared with the current listeners).
BPF_TABLE("sockmap", u32, u64, zddd_sockets, MAX_SERVICES * NTARGETS * SLOTS);

// Which (service slot, target) each connection was assigned to, by its addresses and ports, so
// zddd can count established connections on a listen port per target (they all have the same
// local port). Value: slot * NTARGETS + target.
struct zddd_flow {
    u32 remote_ip[4];  // IPv4: [0] only; network order
    u32 local_ip[4];
    u16 remote_port;   // network order
    u16 local_port;    // host order
    u16 family;
    u16 pad;
};
BPF_TABLE("lru_hash", struct zddd_flow, u32, zddd_flows, FLOW_ENTRIES);

// New connections assigned, per slot * NTARGETS + target.
BPF_TABLE("percpu_array", u32, u64, zddd_steered, MAX_SERVICES * NTARGETS);

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

// MurmurHash3's 32-bit block and finaliser: the split between main and backup is decided by a
// hash of the connection's addresses and ports, not a fresh random number, so a retransmitted
// SYN (or the ACK of a SYN cookie) is handed to the same target as the first.
static __always_inline u32 mix(u32 h, u32 k)
{
    k *= 0xcc9e2d51;
    k = (k << 15) | (k >> 17);
    k *= 0x1b873593;
    h ^= k;
    h = (h << 13) | (h >> 19);
    return h * 5 + 0xe6546b64;
}

static __always_inline u32 flow_hash(const struct zddd_flow *flow)
{
    u32 h = 0x7a646432;
    for (int i = 0; i < 4; i++)
        h = mix(h, flow->remote_ip[i]);
    for (int i = 0; i < 4; i++)
        h = mix(h, flow->local_ip[i]);
    h = mix(h, ((u32)flow->remote_port << 16) | flow->local_port);
    h ^= 36;
    h ^= h >> 16;
    h *= 0x85ebca6b;
    h ^= h >> 13;
    h *= 0xc2b2ae35;
    h ^= h >> 16;
    return h;
}

int zddd_sk_lookup(struct bpf_sk_lookup *ctx)
{
    if (ctx->protocol != IPPROTO_TCP)
        return SK_PASS;
    u32 port = ctx->local_port;
    u32 *found = zddd_services.lookup(&port);
    if (!found)
        return SK_PASS;
    u32 slot = *found;
    if (slot >= MAX_SERVICES)
        return SK_PASS;
    u32 *active = zddd_active.lookup(&slot);
    // Read once: zddd stores a new value through its mapping of the map at any moment.
    u32 chosen = active ? *(volatile u32 *)active : 0;
    if (chosen == 0 || chosen > 101)
        return SK_PASS;
    u32 weight = chosen - 1;

    struct zddd_local local = {};
    struct zddd_flow flow = {};
    local.family = ctx->family;
    flow.family = local.family;
    flow.remote_port = ctx->remote_port;
    flow.local_port = port;
    if (local.family == AF_INET) {
        local.ip4 = ctx->local_ip4;
        flow.remote_ip[0] = ctx->remote_ip4;
        flow.local_ip[0] = local.ip4;
    } else {
        local.ip6[0] = ctx->local_ip6[0];
        local.ip6[1] = ctx->local_ip6[1];
        local.ip6[2] = ctx->local_ip6[2];
        local.ip6[3] = ctx->local_ip6[3];
        flow.remote_ip[0] = ctx->remote_ip6[0];
        flow.remote_ip[1] = ctx->remote_ip6[1];
        flow.remote_ip[2] = ctx->remote_ip6[2];
        flow.remote_ip[3] = ctx->remote_ip6[3];
        flow.local_ip[0] = local.ip6[0];
        flow.local_ip[1] = local.ip6[1];
        flow.local_ip[2] = local.ip6[2];
        flow.local_ip[3] = local.ip6[3];
    }

    u32 target;
    if (weight >= 100)
        target = TARGET_MAIN;
    else if (weight == 0)
        target = TARGET_BACKUP;
    else
        target = flow_hash(&flow) % 100 < weight ? TARGET_MAIN : TARGET_BACKUP;
    u32 index = slot * NTARGETS + target;

    // Sockets bound to the connection's own address first, then wildcard ones.
    int assigned = 0;
    for (int want = 1; want <= 2 && !assigned; want++) {
        for (u32 i = 0; i < SLOTS; i++) {
            u32 key = index * SLOTS + i;
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

    zddd_flows.update(&flow, &index);
    u64 *steered = zddd_steered.lookup(&index);
    if (steered)
        *steered += 1;  // per-CPU: no other writer
    return SK_PASS;
}
