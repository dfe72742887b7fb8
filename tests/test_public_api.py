import alpaca_lora


def test_public_names_exist_and_all_is_sorted():
    assert alpaca_lora.__all__ == sorted(alpaca_lora.__all__)
    for name in alpaca_lora.__all__:
        assert hasattr(alpaca_lora, name), name


def test_error_hierarchy():
    from alpaca_lora import AlpacaLoraError, CheckpointError, ConfigError, DataError, ModelError

    for cls in (ConfigError, DataError, ModelError, CheckpointError):
        assert issubclass(cls, AlpacaLoraError)
    assert issubclass(ConfigError, TypeError) and issubclass(ConfigError, ValueError)
    assert issubclass(DataError, ValueError)
