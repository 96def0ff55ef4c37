"""Quantization settings shared by the export tests (tests/test_export.py) and the import round trips
(tests/test_import.py): each is a case the GPTQ format holds exactly."""

GPTQ_CASES = {
    "int4-sym-g32": dict(bits=4, group_size=32, symmetric=True),
    "int4-asym-g32-rtn": dict(bits=4, group_size=32, method="rtn"),
    "int8-sym-channel": dict(bits=8, group_size=-1, symmetric=True),
    "int3-asym-g32": dict(bits=3, group_size=32),
    "int2-sym-g32": dict(bits=2, group_size=32, symmetric=True),
    "mixed-bits": dict(bits=4, group_size=32, symmetric=True, overrides={r"mlp\.down_proj": {"bits": 8},
                                                                         r"layers\.0\.mlp\.up_proj": None}),
}
