"""blockferry-controller: the inventory, the seeds' REST API, and job
dispatch to agents over gRPC. It never touches volume data itself."""
