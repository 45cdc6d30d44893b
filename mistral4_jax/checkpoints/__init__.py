"""Every byte between disk and parameters: safetensors (HF and Mistral-native layouts), the converted
Orbax format, loading, saving and conversion."""
