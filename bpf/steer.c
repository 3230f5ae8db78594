// zddd's rewriting data plane, for the `tc` and `xdp` backends (compiled by bcc at start).
//
// Every steered service is runtime data in maps, so adding, removing or switching one is map
// writes, never a rebuild: `services` (listen port -> its slot and target ports), `targets`
// (target port -> its service's listen port) and `active` (one u32 per slot: 0 off, 1 + the
// percent of new connections that go to main). The cost per packet is a few hash lookups,
// whatever the number of services.
//
// Ingress (tc clsact ingress, or XDP): a TCP segment for a listen port gets its destination
// port rewritten to the target its flow was pinned to at its first SYN. Egress (tc clsact
// egress): a reply from a target port gets its source port rewritten back to its service's
// listen port, but only for flows ingress steered, so clients that talk to a target port
// directly are never touched. A flow is its addresses, its client port and its listen port:
// one client port may carry connections to two services at once (Linux picks ephemeral ports
// per destination), and after the rewrite they differ by their target port. Everything else passes untouched: not TCP, not IPv4/IPv6,
// IPv6 with extension headers other than up to two Hop-by-Hop/Destination/Routing headers, IP
// fragments, other ports.
//
// Flows are pinned at their first SYN: a SYN without ACK to a local address picks main with
// the service's weight (bpf_get_prandom_u32() % 100 < weight), else backup, and overwrites any
// entry of the same addresses and ports, so a client that reuses its port never inherits an
// old target; in off the old entry is deleted and the SYN passes unchanged (nothing listens on
// the listen port: refused). A retransmission of the first SYN (same sequence number) keeps
// the entry it made, and its choice. Every later segment follows its entry, whatever `active`
// says by then. Entries are never deleted on FIN or RST (a blind or out-of-window RST must not
// cut a live flow loose); the LRU map evicts the least recently used entry when full, and live
// flows refresh theirs with every segment.
//
// Set by zddd: FLOW_ENTRIES, MAX_SERVICES, and PIN_DIR (maps are created there, or reused if
// already pinned; without it they are private, for the probe build). One build holds the tc
// ingress, XDP ingress and egress programs; each backend loads the ones it uses.

#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/in6.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/tcp.h>

#ifndef AF_INET
#define AF_INET 2
#endif
#ifndef AF_INET6
#define AF_INET6 10
#endif

// Keys 0..65535 of `counts` are target ports (new flows steered there); these two count flow
// entries added and deleted, from which zddd estimates how full `flows` is without walking it.
#define COUNT_ADDED 65536
#define COUNT_DELETED 65537
#define COUNT_ENTRIES (2 * MAX_SERVICES + 2)

struct flow_key {
    __u32 client[4];  // IPv4 uses [0]; the rest stays 0
    __u32 local[4];
    __u16 client_port;  // network order
    __u16 family;
    __u16 listen_port;  // host order: the service's
    __u16 pad;
};

struct flow_value {
    __u16 port;         // the target port, host order
    __u16 listen_port;  // the service's listen port, host order (as in the key)
    __u32 syn_seq;  // sequence number of the SYN that chose it: a retransmission is no new flow
};

struct service {
    __u32 slot;  // its element of `active`
    __u16 main_port;
    __u16 backup_port;
};

// The layout stamp zddd writes after building (never read by the programs). Same size as
// layout v1's, whose `listen_port` and `ports` named its one service (0 from v2 on).
struct stamp {
    __u32 magic;
    __u32 version;
    __u32 listen_port;
    __u32 nports;
    __u32 ports[8];
    __u64 build;  // digest of this source and its build options
};

#ifdef PIN_DIR
BPF_TABLE_PINNED("lru_hash", struct flow_key, struct flow_value, flows, FLOW_ENTRIES,
                 PIN_DIR "/flows");
BPF_TABLE_PINNED("array", __u32, __u32, active, MAX_SERVICES, PIN_DIR "/active",
                 BPF_F_MMAPABLE);
BPF_TABLE_PINNED("hash", __u32, struct service, services, MAX_SERVICES, PIN_DIR "/services");
BPF_TABLE_PINNED("hash", __u32, __u32, targets, 2 * MAX_SERVICES, PIN_DIR "/targets");
BPF_TABLE_PINNED("percpu_hash", __u32, __u64, counts, COUNT_ENTRIES, PIN_DIR "/counts");
BPF_TABLE_PINNED("array", __u32, struct stamp, stamp, 1, PIN_DIR "/stamp");
#else
BPF_TABLE("lru_hash", struct flow_key, struct flow_value, flows, FLOW_ENTRIES);
BPF_F_TABLE("array", __u32, __u32, active, MAX_SERVICES, BPF_F_MMAPABLE);
BPF_TABLE("hash", __u32, struct service, services, MAX_SERVICES);
BPF_TABLE("hash", __u32, __u32, targets, 2 * MAX_SERVICES);
BPF_TABLE("percpu_hash", __u32, __u64, counts, COUNT_ENTRIES);
BPF_TABLE("array", __u32, struct stamp, stamp, 1);
#endif

struct packet {
    struct flow_key key;  // from the client's point of view
    struct bpf_fib_lookup fib;
    __u32 l4_offset;
    __u16 sport, dport;  // host order
    __u32 seq;           // raw, only compared
    __u8 syn_only;       // SYN without ACK: a new connection
};

enum { PARSED, PASS, SHORT };

// Parse Ethernet + IPv4/IPv6 + TCP. `ingress` decides which end is the client.
static __always_inline int parse(void *data, void *data_end, struct packet *p, int ingress)
{
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > data_end)
        return SHORT;
    __u32 off = sizeof(*eth);
    struct tcphdr *tcp;
    if (eth->h_proto == bpf_htons(ETH_P_IP)) {
        struct iphdr *ip = data + off;
        if ((void *)(ip + 1) > data_end)
            return SHORT;
        if (ip->protocol != IPPROTO_TCP || ip->ihl < 5)
            return PASS;
        if (ip->frag_off & bpf_htons(0x3fff))  // MF or an offset: a fragment
            return PASS;
        off += ip->ihl * 4;
        tcp = data + off;
        if ((void *)(tcp + 1) > data_end)
            return SHORT;
        p->key.family = AF_INET;
        p->key.client[0] = ingress ? ip->saddr : ip->daddr;
        p->key.local[0] = ingress ? ip->daddr : ip->saddr;
        p->fib.family = AF_INET;
        p->fib.tos = ip->tos;
        p->fib.tot_len = bpf_ntohs(ip->tot_len);
        p->fib.ipv4_src = ip->saddr;
        p->fib.ipv4_dst = ip->daddr;
    } else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
        struct ipv6hdr *ip6 = data + off;
        if ((void *)(ip6 + 1) > data_end)
            return SHORT;
        off += sizeof(*ip6);
        __u8 next = ip6->nexthdr;
        // Skip up to two Hop-by-Hop / Destination / Routing headers: the kernel's own BIG TCP
        // packets carry a Hop-by-Hop jumbo option (lo sends IPv6 segments over 64 KB).
        // Fragments and anything else pass untouched.
#pragma unroll
        for (int i = 0; i < 2; i++) {
            if (next != IPPROTO_HOPOPTS && next != IPPROTO_DSTOPTS && next != IPPROTO_ROUTING)
                break;
            struct ipv6_opt_hdr *ext = data + off;
            if ((void *)(ext + 1) > data_end)
                return SHORT;
            next = ext->nexthdr;
            off += (ext->hdrlen + 1) * 8;
        }
        if (next != IPPROTO_TCP)
            return PASS;
        tcp = data + off;
        if ((void *)(tcp + 1) > data_end)
            return SHORT;
        p->key.family = AF_INET6;
        __builtin_memcpy(ingress ? p->key.client : p->key.local, &ip6->saddr, 16);
        __builtin_memcpy(ingress ? p->key.local : p->key.client, &ip6->daddr, 16);
        p->fib.family = AF_INET6;
        p->fib.tot_len = bpf_ntohs(ip6->payload_len) + sizeof(*ip6);
        __builtin_memcpy(p->fib.ipv6_src, &ip6->saddr, 16);
        __builtin_memcpy(p->fib.ipv6_dst, &ip6->daddr, 16);
    } else {
        return PASS;
    }
    p->l4_offset = off;
    p->sport = bpf_ntohs(tcp->source);
    p->dport = bpf_ntohs(tcp->dest);
    p->key.client_port = ingress ? tcp->source : tcp->dest;
    p->seq = tcp->seq;
    p->syn_only = tcp->syn && !tcp->ack;
    p->fib.l4_protocol = IPPROTO_TCP;
    return PARSED;
}

static __always_inline void count(__u32 key)
{
    __u64 *n = counts.lookup(&key);
    if (n)
        *n += 1;  // per-CPU: no atomics needed
}

// Is the packet for this host? bpf_fib_lookup says NOT_FWDED for local (and broadcast)
// destinations; FWD_DISABLED when the interface does not forward, and then every packet that
// reaches the stack is for this host. Routed traffic (a unicast route out) is never steered.
static __always_inline int for_this_host(void *ctx, struct packet *p, __u32 ifindex)
{
    p->fib.ifindex = ifindex;
    int rc = bpf_fib_lookup(ctx, &p->fib, sizeof(p->fib), 0);
    return rc == BPF_FIB_LKUP_RET_NOT_FWDED || rc == BPF_FIB_LKUP_RET_FWD_DISABLED;
}

// The ingress decision: the new destination port (host order), or 0 to leave the packet.
static __always_inline __u16 ingress_port(void *ctx, struct packet *p, __u32 ifindex)
{
    __u32 dport = p->dport;
    struct service *svc = services.lookup(&dport);
    if (!svc) {
        // A new connection straight to a target port from addresses and a port that a steered
        // flow used before: forget that flow, or egress would rewrite this one's replies.
        __u32 *listen = p->syn_only ? targets.lookup(&dport) : 0;
        if (listen) {
            p->key.listen_port = *listen;
            struct flow_value *old = flows.lookup(&p->key);
            if (old && old->port == p->dport && flows.delete(&p->key) == 0)
                count(COUNT_DELETED);
        }
        return 0;
    }
    p->key.listen_port = p->dport;
    if (!p->syn_only) {
        struct flow_value *v = flows.lookup(&p->key);
        return v ? v->port : 0;
    }
    if (!for_this_host(ctx, p, ifindex))
        return 0;
    // A retransmitted SYN (same sequence number) belongs to the flow its first SYN pinned,
    // whatever was switched since, and is not counted again.
    struct flow_value *pinned = flows.lookup(&p->key);
    if (pinned && pinned->syn_seq == p->seq)
        return pinned->port;
    __u32 slot = svc->slot;
    __u32 *state = active.lookup(&slot);
    // Read once: zddd stores a new value through its mapping of the map at any moment.
    __u32 value = state ? *(volatile __u32 *)state : 0;
    if (value == 0) {
        if (flows.delete(&p->key) == 0)
            count(COUNT_DELETED);
        return 0;
    }
    __u32 weight = value - 1;
    __u16 port = svc->backup_port;
    if (weight >= 100 || (weight > 0 && bpf_get_prandom_u32() % 100 < weight))
        port = svc->main_port;
    if (port == 0)
        return 0;
    struct flow_value v = {.port = port, .listen_port = p->dport, .syn_seq = p->seq};
    if (flows.insert(&p->key, &v) == 0)
        count(COUNT_ADDED);
    else
        flows.update(&p->key, &v);
    count(port);
    return port;
}

// RFC 1624 incremental update of a 16-bit one's-complement checksum (XDP has no helper).
static __always_inline void csum_replace2(__u16 *sum, __u16 old, __u16 new)
{
    __u32 c = (__u16)~*sum;
    c += (__u16)~old;
    c += new;
    c = (c & 0xffff) + (c >> 16);
    c = (c & 0xffff) + (c >> 16);
    *sum = ~c;
}

static __always_inline int tc_parse(struct __sk_buff *skb, struct packet *p, int ingress)
{
    int rc = parse((void *)(long)skb->data, (void *)(long)skb->data_end, p, ingress);
    if (rc != SHORT)
        return rc;
    // Headers not in the linear part (rare): pull just enough and look again.
    __u32 want = sizeof(struct ethhdr) + 40 + 2 * 64 + sizeof(struct tcphdr);
    if (bpf_skb_pull_data(skb, skb->len < want ? skb->len : want))
        return PASS;
    __builtin_memset(p, 0, sizeof(*p));
    rc = parse((void *)(long)skb->data, (void *)(long)skb->data_end, p, ingress);
    return rc == SHORT ? PASS : rc;
}

// Replace a TCP port at `field` (an offset in the TCP header) and fix the checksum the way the
// skb needs it: bpf_l4_csum_replace leaves a CHECKSUM_PARTIAL packet's pseudo-header sum alone
// (ports are not in it) and updates a complete checksum, so offload and GSO/GRO keep working.
static __always_inline void tc_rewrite(struct __sk_buff *skb, struct packet *p, __u32 field,
                                       __u16 old_port, __u16 new_port)
{
    __u16 old_n = bpf_htons(old_port), new_n = bpf_htons(new_port);
    __u32 check = p->l4_offset + offsetof(struct tcphdr, check);
    bpf_l4_csum_replace(skb, check, old_n, new_n, sizeof(new_n));
    bpf_skb_store_bytes(skb, p->l4_offset + field, &new_n, sizeof(new_n), 0);
}

int zddd_ingress(struct __sk_buff *skb)
{
    struct packet p = {};
    if (tc_parse(skb, &p, 1) != PARSED)
        return TC_ACT_UNSPEC;
    __u16 port = ingress_port(skb, &p, skb->ingress_ifindex);
    if (port)
        tc_rewrite(skb, &p, offsetof(struct tcphdr, dest), p.dport, port);
    return TC_ACT_UNSPEC;
}

int zddd_egress(struct __sk_buff *skb)
{
    struct packet p = {};
    if (tc_parse(skb, &p, 0) != PARSED)
        return TC_ACT_UNSPEC;
    __u32 sport = p.sport;
    __u32 *listen = targets.lookup(&sport);
    if (!listen)
        return TC_ACT_UNSPEC;
    p.key.listen_port = *listen;
    struct flow_value *v = flows.lookup(&p.key);
    if (v && v->port == p.sport && v->listen_port)
        tc_rewrite(skb, &p, offsetof(struct tcphdr, source), p.sport, v->listen_port);
    return TC_ACT_UNSPEC;
}

int zddd_xdp(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data, *data_end = (void *)(long)ctx->data_end;
    struct packet p = {};
    if (parse(data, data_end, &p, 1) != PARSED)
        return XDP_PASS;
    __u16 port = ingress_port(ctx, &p, ctx->ingress_ifindex);
    if (!port)
        return XDP_PASS;
    // Bounds again for the verifier: parse() checked them, but on its own pointers.
    struct tcphdr *tcp = data + (p.l4_offset & 0x1fff);
    if ((void *)(tcp + 1) > data_end)
        return XDP_PASS;
    __u16 new_n = bpf_htons(port);
    csum_replace2(&tcp->check, tcp->dest, new_n);
    tcp->dest = new_n;
    return XDP_PASS;
}
