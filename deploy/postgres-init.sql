-- A sample table for the CDC path; Debezium publishes its changes to cdc.app.public.articles.
CREATE TABLE IF NOT EXISTS articles (
    id integer PRIMARY KEY,
    title text NOT NULL,
    body text,
    updated_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO articles (id, title, body) VALUES
    (1, 'Permafrost carbon release', 'Thawing soils emit methane and carbon dioxide.'),
    (2, 'Coral reef bleaching', 'Marine heat waves expel the algae corals live with.')
ON CONFLICT (id) DO NOTHING;
