"""The add-on's bpy-free core: client session, job bookkeeping, mesh welding, local backend.

Nothing in this package imports bpy, so it is tested with plain pytest. The Blender layer
(`blender_addon/*.py`) turns what it returns into objects, materials and panel state.
"""
