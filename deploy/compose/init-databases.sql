-- One database per service (DESIGN.md §5). Run once by the postgres image's
-- entrypoint, on first start with an empty data volume, as POSTGRES_USER (cdp),
-- which therefore owns them.
CREATE DATABASE cdp_ingest;
CREATE DATABASE cdp_identity;
CREATE DATABASE cdp_segmentation;
CREATE DATABASE cdp_activation;
