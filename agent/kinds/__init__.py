"""Job kinds: what each kind of job validates, locks and runs (checksum,
clone and flatten, backup, restore, verify and gc), above the pools and
backup points they use and below the gRPC services that submit them."""
