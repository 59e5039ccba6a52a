"""Run MRIQC's own IQM functions on maps saved by run.py. Executed ONLY with the throwaway MRIQC venv
(e.g. /tmp/mriqc-venv/bin/python); never imports artifactqc (MRIQC pins numpy < 2).

    /tmp/mriqc-venv/bin/python mriqc_side.py MAPS.npz OUT.json
"""

import json
import sys

import numpy as np
from mriqc.qc import anatomical as A


def main(npz, out):
    z = np.load(npz)
    data = z["data"].astype(np.float64)
    head, air, art, seg, frame = (z[k] for k in ("head", "air", "artifact", "seg", "frame"))
    pvms = [z["pv_csf"].astype(np.float64), z["pv_gm"].astype(np.float64), z["pv_wm"].astype(np.float64)]
    bias = z["bias"]
    # As in mriqc.interfaces.anatomical.StructuralQC._run_interface (MRIQC 24.0.2)
    stats = A.summary_stats(data, {"csf": pvms[0], "gm": pvms[1], "wm": pvms[2], "bg": air.astype(np.float64)})
    r = {}
    for t in ("csf", "gm", "wm"):
        r[f"snr_{t}"] = A.snr(stats[t]["median"], stats[t]["stdv"], stats[t]["n"])
    r["snr_total"] = float(np.mean([r[f"snr_{t}"] for t in ("csf", "gm", "wm")]))
    for t in ("csf", "gm", "wm"):
        try:
            r[f"snrd_{t}"] = A.snr_dietrich(stats[t]["median"], mad_air=stats["bg"]["mad"], sigma_air=stats["bg"]["stdv"])
        except Exception as exc:  # known gotcha: crashes on mad_air = 0 (unset logger)
            r[f"snrd_{t}"] = float("nan")
            r["snrd_error"] = f"{type(exc).__name__}: {exc}"
    r["snrd_total"] = float(np.mean([r[f"snrd_{t}"] for t in ("csf", "gm", "wm")]))
    r["cnr"] = A.cnr(stats["wm"]["median"], stats["gm"]["median"], stats["bg"]["stdv"], stats["wm"]["stdv"], stats["gm"]["stdv"])
    r["fber"] = A.fber(data, head, frame)
    r["efc"] = A.efc(data, frame)
    r["wm2max"] = A.wm2max(data, stats["wm"]["median"])
    r["qi_1"] = A.art_qi1(air, art)
    r["cjv"] = A.cjv(stats["wm"]["median"], stats["gm"]["median"], stats["wm"]["mad"], stats["gm"]["mad"])
    b = bias[seg > 0]
    r["inu_range"] = float(np.abs(np.percentile(b, 95.0) - np.percentile(b, 5.0)))
    r["inu_med"] = float(np.median(b))
    for k, v in A.volume_fraction([p.copy() for p in pvms]).items():
        r[f"icvs_{k}"] = v
    for k, v in A.rpve([p.copy() for p in pvms], seg).items():
        r[f"rpve_{k}"] = v
    for t, s in stats.items():
        for k, v in s.items():
            r[f"summary_{t}_{k}"] = v
    with open(out, "w") as f:
        json.dump({k: (float(v) if not isinstance(v, str) else v) for k, v in r.items()}, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
