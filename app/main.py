"""Entry point for ``panel serve app/main.py`` and ``sgf-dmft serve`` (placeholder page)."""
import panel as pn

pn.extension()

pn.template.FastListTemplate(
    title="sgf-dmft",
    main=[pn.pane.Markdown("# sgf-dmft\nThe dashboard is under construction.")],
).servable()
