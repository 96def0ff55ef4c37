"""Format-agnostic numerical solvers the formats code with (GPTQ's error feedback). They know nothing of layouts:
a format passes its own rounding step."""
