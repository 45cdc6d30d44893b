"""Every byte between disk and parameters: safetensors (HF and Mistral-native layouts), the converted
Orbax format, loading, saving and conversion.

Each module imports only those before it: safetensors_io (files), names (the name table and its
transforms), plan (tensors -> parameter slots, checked), read (one slot reader, one assembler), native
(params.json), orbax (the converted format), load (`from_pretrained`), save (`save_pretrained`),
convert (the conversion driver)."""
