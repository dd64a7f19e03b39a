# Vendored test oracle: the official Google Landmarks v2 scorer, unmodified apart from
# the one change listed below. Used only by tests/test_metrics.py (parity test).
#
# Sources (github.com/tensorflow/models):
#   research/delf/delf/python/datasets/google_landmarks_dataset/dataset_file_io.py
#     at commit 3617973260592c3a85aceeaab7576d198246784f
#   research/delf/delf/python/datasets/google_landmarks_dataset/metrics.py
#     at commit e4009b236c08afc812b18060c9976f0a3764ee52
# The two files are concatenated here (dataset_file_io first, then metrics); their
# module docstrings and `from __future__` lines are kept once at the top.
#
# Only change: `tf.io.gfile.GFile(file_path, 'r')` -> built-in `open(file_path, 'r')`
# (and `import tensorflow as tf` removed), so no TensorFlow is needed.
#
# Copyright 2019 The TensorFlow Authors All Rights Reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
# ==============================================================================
"""IO module for files from Landmark recognition/retrieval challenges.

Python module to compute metrics for Google Landmarks dataset.
"""

from __future__ import absolute_import
from __future__ import division
from __future__ import print_function

import csv

import numpy as np

# ------------------------------------------------------------------ dataset_file_io.py

RECOGNITION_TASK_ID = 'recognition'
RETRIEVAL_TASK_ID = 'retrieval'


def ReadSolution(file_path, task):
  """Reads solution from file, for a given task.

  Args:
    file_path: Path to CSV file with solution. File contains a header.
    task: Type of challenge task. Supported values: 'recognition', 'retrieval'.

  Returns:
    public_solution: Dict mapping test image ID to list of ground-truth IDs, for
      the Public subset of test images. If `task` == 'recognition', the IDs are
      integers corresponding to landmark IDs. If `task` == 'retrieval', the IDs
      are strings corresponding to index image IDs.
    private_solution: Same as `public_solution`, but for the private subset of
      test images.
    ignored_ids: List of test images that are ignored in scoring.

  Raises:
    ValueError: If Usage field is not Public, Private or Ignored; or if `task`
      is not supported.
  """
  public_solution = {}
  private_solution = {}
  ignored_ids = []
  with open(file_path, 'r') as csv_file:
    reader = csv.reader(csv_file)
    next(reader, None)  # Skip header.
    for row in reader:
      test_id = row[0]
      if row[2] == 'Ignored':
        ignored_ids.append(test_id)
      else:
        ground_truth_ids = []
        if task == RECOGNITION_TASK_ID:
          if row[1]:
            for landmark_id in row[1].split(' '):
              ground_truth_ids.append(int(landmark_id))
        elif task == RETRIEVAL_TASK_ID:
          for image_id in row[1].split(' '):
            ground_truth_ids.append(image_id)
        else:
          raise ValueError('Unrecognized task: %s' % task)

        if row[2] == 'Public':
          public_solution[test_id] = ground_truth_ids
        elif row[2] == 'Private':
          private_solution[test_id] = ground_truth_ids
        else:
          raise ValueError('Test image %s has unrecognized Usage tag %s' %
                           (row[0], row[2]))

  return public_solution, private_solution, ignored_ids


def ReadPredictions(file_path, public_ids, private_ids, ignored_ids, task):
  """Reads predictions from file, for a given task.

  Args:
    file_path: Path to CSV file with predictions. File contains a header.
    public_ids: Set (or list) of test image IDs in Public subset of test images.
    private_ids: Same as `public_ids`, but for the private subset of test
      images.
    ignored_ids: Set (or list) of test image IDs that are ignored in scoring and
      are associated to no ground-truth.
    task: Type of challenge task. Supported values: 'recognition', 'retrieval'.

  Returns:
    public_predictions: Dict mapping test image ID to prediction, for the Public
      subset of test images. If `task` == 'recognition', the prediction is a
      dict with keys 'class' (integer) and 'score' (float). If `task` ==
      'retrieval', the prediction is a list of strings corresponding to index
      image IDs.
    private_predictions: Same as `public_predictions`, but for the private
      subset of test images.

  Raises:
    ValueError:
      - If test image ID is unrecognized/repeated;
      - If `task` is not supported;
      - If prediction is malformed.
  """
  public_predictions = {}
  private_predictions = {}
  with open(file_path, 'r') as csv_file:
    reader = csv.reader(csv_file)
    next(reader, None)  # Skip header.
    for row in reader:
      # Skip row if empty.
      if not row:
        continue

      test_id = row[0]

      # Makes sure this query has not yet been seen.
      if test_id in public_predictions:
        raise ValueError('Test image %s is repeated.' % test_id)
      if test_id in private_predictions:
        raise ValueError('Test image %s is repeated' % test_id)

      # If ignored, skip it.
      if test_id in ignored_ids:
        continue

      # Only parse result if there is a prediction.
      if row[1]:
        prediction_split = row[1].split(' ')
        # Remove empty spaces at end (if any).
        if not prediction_split[-1]:
          prediction_split = prediction_split[:-1]

        if task == RECOGNITION_TASK_ID:
          if len(prediction_split) != 2:
            raise ValueError('Prediction is malformed: there should only be 2 '
                             'elements in second column, but found %d for test '
                             'image %s' % (len(prediction_split), test_id))

          landmark_id = int(prediction_split[0])
          score = float(prediction_split[1])
          prediction_entry = {'class': landmark_id, 'score': score}
        elif task == RETRIEVAL_TASK_ID:
          prediction_entry = prediction_split
        else:
          raise ValueError('Unrecognized task: %s' % task)

        if test_id in public_ids:
          public_predictions[test_id] = prediction_entry
        elif test_id in private_ids:
          private_predictions[test_id] = prediction_entry
        else:
          raise ValueError('test_id %s is unrecognized' % test_id)

  return public_predictions, private_predictions


# ------------------------------------------------------------------ metrics.py


def _CountPositives(solution):
  """Counts number of test images with non-empty ground-truth in `solution`.

  Args:
    solution: Dict mapping test image ID to list of ground-truth IDs.

  Returns:
    count: Number of test images with non-empty ground-truth.
  """
  count = 0
  for v in solution.values():
    if v:
      count += 1

  return count


def GlobalAveragePrecision(predictions,
                           recognition_solution,
                           ignore_non_gt_test_images=False):
  """Computes global average precision for recognition prediction.

  Args:
    predictions: Dict mapping test image ID to a dict with keys 'class'
      (integer) and 'score' (float).
    recognition_solution: Dict mapping test image ID to list of ground-truth
      landmark IDs.
    ignore_non_gt_test_images: If True, ignore test images which do not have
      associated ground-truth landmark IDs. For the Google Landmark Recognition
      challenge, this should be set to False.

  Returns:
    gap: Global average precision score (float).
  """
  # Compute number of expected results.
  num_positives = _CountPositives(recognition_solution)

  gap = 0.0
  total_predictions = 0
  correct_predictions = 0

  # Sort predictions according to Kaggle's convention:
  # - first by score (descending);
  # - then by key (ascending);
  # - then by class (ascending).
  sorted_predictions_by_key_class = sorted(
      predictions.items(), key=lambda item: (item[0], item[1]['class']))
  sorted_predictions = sorted(
      sorted_predictions_by_key_class,
      key=lambda item: item[1]['score'],
      reverse=True)

  # Loop over sorted predictions (descending order) and compute GAPs.
  for key, prediction in sorted_predictions:
    if ignore_non_gt_test_images and not recognition_solution[key]:
      continue

    total_predictions += 1
    if prediction['class'] in recognition_solution[key]:
      correct_predictions += 1
      gap += correct_predictions / total_predictions

  gap /= num_positives

  return gap


def Top1Accuracy(predictions, recognition_solution):
  """Computes top-1 accuracy for recognition prediction.

  Note that test images without ground-truth are ignored.

  Args:
    predictions: Dict mapping test image ID to a dict with keys 'class'
      (integer) and 'score' (float).
    recognition_solution: Dict mapping test image ID to list of ground-truth
      landmark IDs.

  Returns:
    accuracy: Top-1 accuracy (float).
  """
  # Loop over test images in solution. If it has at least one class label, we
  # check if the predicion is correct.
  num_correct_predictions = 0
  num_test_images_with_ground_truth = 0
  for key, ground_truth in recognition_solution.items():
    if ground_truth:
      num_test_images_with_ground_truth += 1
      if key in predictions:
        if predictions[key]['class'] in ground_truth:
          num_correct_predictions += 1

  return num_correct_predictions / num_test_images_with_ground_truth


def MeanAveragePrecision(predictions, retrieval_solution, max_predictions=100):
  """Computes mean average precision for retrieval prediction.

  Args:
    predictions: Dict mapping test image ID to a list of strings corresponding
      to index image IDs.
    retrieval_solution: Dict mapping test image ID to list of ground-truth image
      IDs.
    max_predictions: Maximum number of predictions per query to take into
      account. For the Google Landmark Retrieval challenge, this should be set
      to 100.

  Returns:
    mean_ap: Mean average precision score (float).

  Raises:
    ValueError: If a test image in `predictions` is not included in
      `retrieval_solutions`.
  """
  # Compute number of test images.
  num_test_images = len(retrieval_solution.keys())

  # Loop over predictions for each query and compute mAP.
  mean_ap = 0.0
  for key, prediction in predictions.items():
    if key not in retrieval_solution:
      raise ValueError('Test image %s is not part of retrieval_solution' % key)

    # Loop over predicted images, keeping track of those which were already
    # used (duplicates are skipped).
    ap = 0.0
    already_predicted = set()
    num_expected_retrieved = min(len(retrieval_solution[key]), max_predictions)
    num_correct = 0
    for i in range(min(len(prediction), max_predictions)):
      if prediction[i] not in already_predicted:
        if prediction[i] in retrieval_solution[key]:
          num_correct += 1
          ap += num_correct / (i + 1)
        already_predicted.add(prediction[i])

    ap /= num_expected_retrieved
    mean_ap += ap

  mean_ap /= num_test_images

  return mean_ap


def MeanPrecisions(predictions, retrieval_solution, max_predictions=100):
  """Computes mean precisions for retrieval prediction.

  Args:
    predictions: Dict mapping test image ID to a list of strings corresponding
      to index image IDs.
    retrieval_solution: Dict mapping test image ID to list of ground-truth image
      IDs.
    max_predictions: Maximum number of predictions per query to take into
      account.

  Returns:
    mean_precisions: NumPy array with mean precisions at ranks 1 through
      `max_predictions`.

  Raises:
    ValueError: If a test image in `predictions` is not included in
      `retrieval_solutions`.
  """
  # Compute number of test images.
  num_test_images = len(retrieval_solution.keys())

  # Loop over predictions for each query and compute precisions@k.
  precisions = np.zeros((num_test_images, max_predictions))
  count_test_images = 0
  for key, prediction in predictions.items():
    if key not in retrieval_solution:
      raise ValueError('Test image %s is not part of retrieval_solution' % key)

    # Loop over predicted images, keeping track of those which were already
    # used (duplicates are skipped).
    already_predicted = set()
    num_correct = 0
    for i in range(max_predictions):
      if i < len(prediction):
        if prediction[i] not in already_predicted:
          if prediction[i] in retrieval_solution[key]:
            num_correct += 1
          already_predicted.add(prediction[i])
      precisions[count_test_images, i] = num_correct / (i + 1)
    count_test_images += 1

  mean_precisions = np.mean(precisions, axis=0)

  return mean_precisions


def MeanMedianPosition(predictions, retrieval_solution, max_predictions=100):
  """Computes mean and median positions of first correct image.

  Args:
    predictions: Dict mapping test image ID to a list of strings corresponding
      to index image IDs.
    retrieval_solution: Dict mapping test image ID to list of ground-truth image
      IDs.
    max_predictions: Maximum number of predictions per query to take into
      account.

  Returns:
    mean_position: Float.
    median_position: Float.

  Raises:
    ValueError: If a test image in `predictions` is not included in
      `retrieval_solutions`.
  """
  # Compute number of test images.
  num_test_images = len(retrieval_solution.keys())

  # Loop over predictions for each query to find first correct ranked image.
  positions = (max_predictions + 1) * np.ones((num_test_images))
  count_test_images = 0
  for key, prediction in predictions.items():
    if key not in retrieval_solution:
      raise ValueError('Test image %s is not part of retrieval_solution' % key)

    for i in range(min(len(prediction), max_predictions)):
      if prediction[i] in retrieval_solution[key]:
        positions[count_test_images] = i + 1
        break

    count_test_images += 1

  mean_position = np.mean(positions)
  median_position = np.median(positions)

  return mean_position, median_position
