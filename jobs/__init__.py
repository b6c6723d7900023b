"""The `dualtok` command (installed as `dualtok.jobs`): one module per subcommand, each a typed
config and the wiring from that config to a pipeline in `dualtok.pipelines`. No pipeline logic
lives here."""
