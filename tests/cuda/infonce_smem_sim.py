"""Model of the shared-memory phases (between barriers) of csrc/kernels/infonce_*'s 16-bit
fwd_kernel and grad_kernel for several D: within a phase no two accesses to overlapping bytes may
include a write, no cp.async may be issued over bytes still in flight or read by the MMAs before
its wait and barrier, and the backward's slab chunk must not overwrite a resident X. Offsets
repeat infonce_fwd.cu's FwdSmem and infonce_bwd.cu's GradSmem (kept by hand: update both).
Run: python3 tests/cuda/infonce_smem_sim.py (seconds, no GPU); mutating the offsets (e.g. ys = 0
with X resident, or one Y stage) makes it fail."""
CH, KY, KH, STAT = 8192, 17408, 8192, 2048
def x_slots(D):
    nk = -(-D // 64); return (nk if nk > 0 else 1) if nk <= 8 else 2

def ov(a, b): return a[0] < b[1] and b[0] < a[1]

class Sim:
    def __init__(s): s.phase, s.errors = [], []
    def acc(s, kind, lo, hi, what): s.phase.append((kind, (lo, hi), what))
    def barrier(s):
        p = s.phase
        for i, (k1, r1, w1) in enumerate(p):
            for k2, r2, w2 in p[i + 1:]:
                if (k1 == "w" or k2 == "w") and ov(r1, r2) and w1 != w2:
                    s.errors.append(f"race in one phase: {k1} {w1} {r1} vs {k2} {w2} {r2}")
        s.phase = []

def dot_tile(s, D, xbase, ybase, x_res, load_x):
    nk = -(-D // 64)
    s.barrier()
    groups = []
    def issue(kc):
        g = []
        if load_x:
            xs = kc if x_res else kc & 1
            g.append(((xbase + xs * CH, xbase + (xs + 1) * CH), f"X chunk {kc}"))
        g.append(((ybase + (kc & 1) * CH, ybase + ((kc & 1) + 1) * CH), f"Y chunk {kc}"))
        for r, w in g:
            for (pr, pw) in [p for grp in groups for p in grp]:
                if ov(r, pr): s.errors.append(f"issue {w} over in-flight {pw}")
            s.acc("w", r[0], r[1], w)
        groups.append(g)
    if nk > 0: issue(0)
    for kc in range(nk):
        if kc + 1 < nk:
            issue(kc + 1); del groups[:-1]  # wait_group 1: all but the newest complete
        else:
            groups.clear()  # wait_group 0
        s.barrier()
        xs = kc if x_res else kc & 1
        for (r, w) in [p for grp in groups for p in grp]:
            for rr in [(xbase + xs * CH, xbase + (xs + 1) * CH), (ybase + (kc & 1) * CH, ybase + ((kc & 1) + 1) * CH)]:
                if ov(r, rr): s.errors.append(f"compute chunk {kc} reads in-flight {w}")
        s.acc("r", xbase + xs * CH, xbase + (xs + 1) * CH, "X read")
        s.acc("r", ybase + (kc & 1) * CH, ybase + ((kc & 1) + 1) * CH, "Y read")
        s.barrier()
    s.acc("w", ybase, ybase + KY, "sD"); s.barrier()
    s.acc("r", ybase, ybase + KY, "sD"); s.barrier()

def fwd(D, ncols=3):
    s = Sim(); x_res = D <= 512; y = x_slots(D) * CH if x_res else 2 * CH
    cm = y + KY; cl = cm + STAT; total = cl + STAT
    for cb in range(ncols):
        dot_tile(s, D, 0, y, x_res, not x_res or cb == 0)
        s.acc("w", cm, cm + STAT, "s_cm"); s.barrier()
        s.acc("r", cm, cm + STAT, "s_cm"); s.acc("w", cl, cl + STAT, "s_cl"); s.barrier()
        s.acc("r", cm, cm + STAT, "s_cm"); s.acc("r", cl, cl + STAT, "s_cl")
    if x_res and y < -(-D // 64) * CH: s.errors.append("X slots too few")
    return s.errors, total

def bwd(D, DV, ncols=3):
    s = Sim(); x_res = DV == 256 and D <= DV
    y = (x_slots(D) if x_res else 2) * CH; ys = y if x_res else 0
    tiles, slab_end = y + KY, ys + DV * 128
    h = max(tiles, slab_end); red = h + KH; total = red + 128
    nk = -(-D // 64)
    for cb in range(ncols):
        dot_tile(s, D, 0, y, x_res, not x_res or cb == 0)
        s.acc("w", h, h + KH, "sH"); s.barrier()
        s.acc("w", ys, slab_end, "slab"); s.barrier()
        s.acc("r", h, h + KH, "sH"); s.acc("r", ys, slab_end, "slab")
        if x_res and ov((ys, slab_end), (0, nk * CH)): s.errors.append("slab overwrites resident X")
    s.acc("w", red, red + 32, "red"); s.barrier()
    return s.errors, total

bad = 0
for D in [1, 8, 64, 65, 129, 256, 264, 448, 504, 512, 520, 1000]:
    e, t = fwd(D); bad += len(e); print(f"fwd D={D}: {t} B, {'ok' if not e else e[:3]}")
    for DV in (256, 512):
        if DV == 512 and D <= 256: continue
        if DV == 256 and D > 256: continue
        e, t = bwd(D, DV); bad += len(e); print(f"  bwd D={D} DV={DV}: {t} B, {'ok' if not e else e[:3]}")
    e, t = bwd(D, 256) if D > 256 else (0, 0)  # the dscale-only pass uses DV = 256 for any D
    if e: bad += len(e); print("  dscale-only pass", e[:3])
print("FAILED" if bad else "all phases race-free")
raise SystemExit(1 if bad else 0)
