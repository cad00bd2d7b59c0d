"""The report's history section: the flag rate of every audit against the rate the calibration predicts.

One point per audit (its flag rate, with the Beta-binomial interval where an in-distribution night
of that size falls), the expected rate ``(n − k + 1)/(n + 1)`` as a line with its Beta interval as
a band, and the audits whose drift test alarmed in red. Input: the frame of
:func:`odin_engine.decide.history.read_history`.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from .report import _esc, _img_tag, _mpl, _png, _table

TABLE_ROWS = 30


def _pct(v: Any) -> str:
    return "" if v is None or pd.isna(v) else f"{100 * float(v):.2f}"


def history_png(df: pd.DataFrame) -> str:
    """The plot, as base64 PNG (``df`` non-empty, sorted by time)."""
    plt = _mpl()
    t = pd.to_datetime(df["finished_at"], utc=True).dt.tz_localize(None)
    fig, ax = plt.subplots(figsize=(8, 3.6))
    exp, lo, hi = (100 * df[c].astype("float64") for c in ("expected_rate", "expected_rate_lo", "expected_rate_hi"))
    band = "expected rate, {:g}% interval".format(100 * float(df["confidence"].iloc[-1]))
    if len(df) > 1:
        ax.fill_between(t, lo, hi, step="mid", color="tab:green", alpha=0.15, label=band)
        ax.step(t, exp, where="mid", color="tab:green", label="expected rate (n − k + 1)/(n + 1)")
    else:
        ax.axhspan(float(lo.iloc[0]), float(hi.iloc[0]), color="tab:green", alpha=0.15, label=band)
        ax.axhline(float(exp.iloc[0]), color="tab:green", label="expected rate (n − k + 1)/(n + 1)")
    rate = 100 * df["flag_rate"].astype("float64")
    has = rate.notna().to_numpy()
    alarm = df["alarm"].fillna(False).astype(bool).to_numpy() & has
    calm = has & ~alarm
    p_lo = 100 * df["predicted_rate_lo"].astype("float64")
    p_hi = 100 * df["predicted_rate_hi"].astype("float64")
    pred = p_lo.notna().to_numpy()
    if pred.any():
        ax.vlines(t[pred], p_lo[pred], p_hi[pred], color="0.55", lw=2, alpha=0.5,
                  label="an ID night of this size falls here")
    for mask, color, label in ((calm, "tab:blue", "flag rate"), (alarm, "tab:red", "flag rate, drift alarm")):
        if mask.any():
            ax.plot(t[mask], rate[mask], "o", color=color, label=label, zorder=3)
    if len(df) == 1:
        pad = pd.Timedelta(hours=12)
        ax.set_xlim(t.iloc[0] - pad, t.iloc[0] + pad)
    ax.set_ylabel("flagged (% of scored images)")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    fig.autofmt_xdate()
    return _png(fig)


def history_plot_html(df: pd.DataFrame, title: str = "History") -> str:
    """An HTML fragment (heading, plot, table of the latest audits); ``""`` for an empty history."""
    if df is None or df.empty:
        return ""
    df = df.sort_values("finished_at", kind="stable").reset_index(drop=True)
    alarms = int(df["alarm"].fillna(False).astype(bool).sum())
    alphas = sorted({float(a) for a in df["alpha"].dropna()})
    parts = [f"<h2>{_esc(title)}</h2>", _img_tag(history_png(df), "flag rate per audit"),
             "<p class='note'>"
             f"{len(df)} audit(s); {alarms} drift alarm(s)"
             + (f" at α = {', '.join(f'{a:g}' for a in alphas)}" if alphas else "")
             + ". Bars: where the flag rate of an in-distribution night of that size falls "
               "(Beta-binomial interval). Nights are comparable within one calibration (δ).</p>"]
    rows = []
    for _, r in df.tail(TABLE_ROWS).iloc[::-1].iterrows():
        p = r["p_value"]
        rows.append([
            pd.Timestamp(r["finished_at"]).strftime("%Y-%m-%d %H:%M:%SZ"),
            int(r["n_ok"]), int(r["n_error"]), int(r["n_flagged"]), _pct(r["flag_rate"]),
            f"{_pct(r['expected_rate'])} [{_pct(r['expected_rate_lo'])}, {_pct(r['expected_rate_hi'])}]",
            "" if p is None or pd.isna(p) else f"{float(p):.3g}",
            {True: "ALARM", False: "ok"}.get(None if pd.isna(r["alarm"]) else bool(r["alarm"]), "–"),
        ])
    parts.append(_table(rows, ["finished (UTC)", "ok", "errors", "flagged", "flag %", "expected % [interval]",
                               "p-value", "drift"]))
    if len(df) > TABLE_ROWS:
        parts.append(f"<p class='note'>latest {TABLE_ROWS} of {len(df)} audits.</p>")
    return "".join(parts)
