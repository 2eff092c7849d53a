"""Small fakes of outside services that the tests use instead of the network."""
