"""Where backends come from. `static`: the flags' fixed list; `demo`: in-process engines."""
