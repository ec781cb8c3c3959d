"""Device harness: benchmark exported models on CPU and mobile targets.

``devices.harness.bench`` (CLI: ``devices.cli.bench``, registered as ``tasa-edge bench``) measures
size, load time, peak RSS, llama-bench-style speed, memory-bandwidth use, KL-divergence / top-1 vs
the float reference on general and GSM8K text, and GSM8K accuracy, locally or over adb / ssh.
See ``devices/README.md``.
"""
