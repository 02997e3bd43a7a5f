"""Default settings of a generation, in a module that imports nothing heavy: the CLI's help shows them without
loading torch, and the modules that use them import them from here."""

MODES = {"quality": 50, "fast": 4}  # mode -> default number of steps
DEFAULT_GUIDANCE = (3.0, 2.0, 2.0)  # the authors' weights (no_kv, full, kv): lcmla_sdk.guidance.Guidance
AUTHORS_FREEU = (1.0, 1.1, 0.9, 0.2)  # the authors' README values (b1, b2, s1, s2): lcmla_sdk.freeu
