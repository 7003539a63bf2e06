"""``lctfound web``: the LCTfound panels in the browser, over trame-slicer (``pip install 'lctfound[web]'``).

The panels drive the same Qt-free logic classes as the 3D Slicer modules (`lctfound.logic`) on
a trame-slicer scene; the Segment Editor tools are trame-slicer's. Submodules:

  security            binding, tokens, the HTTP/websocket access gate, data roots, uploads (no trame)
  config, loading     server settings; reading uploads, server-side paths and the sample (no trame)
  export              .seg.nrrd, NIfTI labelmap, DICOM SEG and volume exports from the scene (no trame)
  app                 the trame app: views, Segment Editor, loading, window presets
  segmentation_panel  few-shot train/predict, structures, diagnosis, reviewed slices
  enhance_panel       every enhancement task, input/result comparison (slider or side by side)
  train_panel         pretrain / fine-tune jobs with progress, loss curve, cancel, resume
  export_panel        export buttons and downloads
  server              start-up: the access gate on the web server, the URL line

Only this package (with `lctfound.mrml` and `lctfound.logic`) may import Slicer, and only this
package imports trame. Importing ``lctfound.web`` itself imports neither.
"""
